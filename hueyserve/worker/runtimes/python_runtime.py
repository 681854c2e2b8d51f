"""Custom code: `model.py` in the model folder defines `class Model(Runtime)`.

This runs whatever model.py says, with the worker's rights, so hueyserve loads it only when the
operator turns on HUEYSERVE_ALLOW_PYTHON_MODELS (checked in `load_runtime`). Each folder's
model.py is imported under its own module name, so two versions never share a module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from hueyserve.artifacts import RUNTIME_ARTIFACTS
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature


class PythonRuntime(Runtime):
    """Delegates every step to the folder's `Model`."""

    name = "python"
    artifacts = RUNTIME_ARTIFACTS["python"]
    model: Runtime

    def load(self) -> Signature | None:
        model_class = self._import_model_class()
        self.model = model_class(self.folder, self.metadata, self.options)
        try:
            return self.model.load()
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.artifact()}: Model.load() failed: {type(exc).__name__}: {exc}"
            ) from exc

    def predict(self, batch: np.ndarray) -> Mapping[str, Any]:
        return self.model.predict(batch)

    def preprocess(self, rows: np.ndarray) -> np.ndarray:
        return self.model.preprocess(rows)

    def postprocess(self, outputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        return self.model.postprocess(outputs)

    def _import_model_class(self) -> type[Runtime]:
        path = self.artifact()
        digest = hashlib.sha256(str(self.folder.resolve()).encode()).hexdigest()[:16]
        module_name = f"hueyserve_model_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ModelLoadError(f"{path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up here
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise ModelLoadError(f"{path} failed to import: {type(exc).__name__}: {exc}") from exc
        found = getattr(module, "Model", None)
        if found is None:
            raise ModelLoadError(f"{path} has no Model class: define `class Model(Runtime)`")
        if not (isinstance(found, type) and issubclass(found, Runtime)):
            raise ModelLoadError(
                f"Model in {path} must be a subclass of hueyserve.worker.runtimes.base.Runtime"
            )
        return found
