"""XGBoost boosters saved with `save_model` (`model.json` or `model.ubj`), not pickled.

The output's shape is learned at load by predicting one row of zeros: a regressor or binary
classifier gives one value per row, a multi-class `multi:softprob` one probability per class.
"""

from __future__ import annotations

import numpy as np
import xgboost

from hueyserve.artifacts import RUNTIME_ARTIFACTS
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature


class XGBoostRuntime(Runtime):
    """An `xgboost.Booster` on one thread: a worker already runs several threads."""

    name = "xgboost"
    artifacts = RUNTIME_ARTIFACTS["xgboost"]
    booster: xgboost.Booster

    def load(self) -> Signature:
        path = self.artifact()
        try:
            self.booster = xgboost.Booster(params={"nthread": 1}, model_file=str(path))
        except xgboost.core.XGBoostError as exc:
            raise ModelLoadError(f"xgboost could not load {path}: {exc}") from exc
        n_features = self.booster.num_features()
        return self.probed_signature(n_features, "FP32")

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        # inplace_predict skips building a DMatrix: the same answers, less per-call work.
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return {"predict": np.asarray(self.booster.inplace_predict(x))}
