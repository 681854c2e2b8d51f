"""LightGBM boosters saved as text (`model.txt`), LightGBM's own portable format.

The output's shape is learned at load by predicting one row of zeros: a regressor or binary
classifier gives one value per row, a multi-class model one probability per class.
"""

from __future__ import annotations

import lightgbm
import numpy as np

from hueyserve.artifacts import RUNTIME_ARTIFACTS
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature


class LightGBMRuntime(Runtime):
    """A `lightgbm.Booster` predicting on one thread: a worker already runs several threads."""

    name = "lightgbm"
    artifacts = RUNTIME_ARTIFACTS["lightgbm"]
    booster: lightgbm.Booster

    def load(self) -> Signature:
        path = self.artifact()
        try:
            self.booster = lightgbm.Booster(model_file=str(path))
        except lightgbm.basic.LightGBMError as exc:
            raise ModelLoadError(f"lightgbm could not load {path}: {exc}") from exc
        n_features = self.booster.num_feature()
        return self.probed_signature(n_features, "FP64")

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = np.asarray(batch, dtype=np.float64)
        return {"predict": np.asarray(self.booster.predict(x, num_threads=1))}
