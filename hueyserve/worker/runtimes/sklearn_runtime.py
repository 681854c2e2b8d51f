"""scikit-learn estimators saved with skops (`model.skops`), never unpickled.

skops loads only the types it is told to trust: its own safe defaults (numpy, sklearn
estimators), a forest's Tree, and what the operator adds in HUEYSERVE_TRUSTED_TYPES. A file
that needs anything else is refused before any of it is built.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import skops.io
from sklearn.base import is_classifier

from hueyserve.artifacts import RUNTIME_ARTIFACTS
from hueyserve.models import label_datatype
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature, Tensor

#: Types a model file may contain beyond skops' own safe defaults.
TRUSTED_TYPES: tuple[str, ...] = ("sklearn.tree._tree.Tree",)


class SklearnRuntime(Runtime):
    """An estimator or Pipeline: numeric rows in, or text when it starts with a vectorizer."""

    name = "sklearn"
    artifacts = RUNTIME_ARTIFACTS["sklearn"]
    estimator: Any
    _probabilities = False  #: a classifier with predict_proba

    def load(self) -> Signature:
        path = self.artifact()
        trusted = [*TRUSTED_TYPES, *self.options.get("trusted_types", ())]
        try:
            untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(trusted))
            if not untrusted:
                self.estimator = skops.io.load(path, trusted=trusted)
        except Exception as exc:  # a truncated or foreign file: skops raises many kinds
            raise ModelLoadError(f"{path} could not be loaded by skops: {exc}") from exc
        if untrusted:
            raise ModelLoadError(
                f"{path} needs types that are not trusted: {untrusted}; add them to "
                "HUEYSERVE_TRUSTED_TYPES only if you trust the file's origin"
            )
        return self._signature()

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outputs = {"predict": np.asarray(self.estimator.predict(batch))}
        if self._probabilities:
            outputs["predict_proba"] = np.asarray(self.estimator.predict_proba(batch))
        return outputs

    def _signature(self) -> Signature:
        estimator = self.estimator
        if hasattr(estimator, "n_features_in_"):
            n_features = int(estimator.n_features_in_)
            given = Tensor(self.declared_input_name("features"), "FP64", (-1, n_features))
        else:  # a vectorizer first: it takes raw strings, one per row
            given = Tensor(self.declared_input_name("text"), "BYTES", (-1,))
        if not is_classifier(estimator):
            n_outputs = int(getattr(estimator, "n_outputs_", 1))
            shape = (-1,) if n_outputs == 1 else (-1, n_outputs)
            return Signature((given,), (Tensor("predict", "FP64", shape),))
        classes = np.asarray(estimator.classes_).tolist()
        outputs = [Tensor("predict", label_datatype(classes), (-1,))]
        if hasattr(estimator, "predict_proba"):
            self._probabilities = True
            outputs.append(Tensor("predict_proba", "FP64", (-1, len(classes))))
        return Signature((given,), tuple(outputs), tuple(classes))
