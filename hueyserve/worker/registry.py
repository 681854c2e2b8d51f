"""Models loaded in one worker process, by (name, version), loaded on first use.

Tasks always name the exact version to use (the API resolved it), so a promotion never changes
the answer of a task already queued for the old one. A LoadedModel wraps a runtime
(hueyserve.worker.runtimes) and checks what it returns: every output one entry per input row,
or the request fails with the reason, never a wrong answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cachetools import LRUCache

from hueyserve.models import Outputs, check_name_and_version
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature, Tensor

logger = logging.getLogger(__name__)

RETRY_LOAD_S = 30.0  #: an active version that failed to load is tried again this much later

#: Arrays by output name, one entry per row (before `finish` turns them into lists).
Arrays = dict[str, np.ndarray]


class OutputMismatch(ModelLoadError):
    """A runtime answered with outputs not aligned with its input rows."""


@dataclass(frozen=True)
class LoadedModel:
    """A runtime ready to predict, with its signature and the version's metadata."""

    name: str
    version: str
    runtime: Runtime
    signature: Signature
    metadata: Mapping[str, Any]

    def prepare(self, rows: np.ndarray) -> np.ndarray:
        """One request's rows through the runtime's preprocess."""
        prepared = np.asarray(self.runtime.preprocess(rows))
        if len(prepared) != len(rows):
            raise OutputMismatch(
                f"{self.name} version {self.version}: preprocess turned {len(rows)} rows into "
                f"{len(prepared)}; it must keep one row per input row"
            )
        return prepared

    def predict(self, batch: np.ndarray) -> Arrays:
        """The batched call: every output of the runtime, checked row by row."""
        return self._aligned(self.runtime.predict(batch), len(batch), "predict")

    def finish(self, outputs: Arrays) -> Outputs:
        """One request's outputs through the runtime's postprocess, as lists."""
        rows = len(next(iter(outputs.values()))) if outputs else 0
        finished = self._aligned(self.runtime.postprocess(outputs), rows, "postprocess")
        return {name: column.tolist() for name, column in finished.items()}

    def answer(self, rows: np.ndarray) -> Outputs:
        """One request's outputs, unbatched (the smoke prediction)."""
        return self.finish(self.predict(self.prepare(rows)))

    def _aligned(self, outputs: Mapping[str, Any], rows: int, step: str) -> Arrays:
        if not isinstance(outputs, Mapping) or not outputs:
            raise OutputMismatch(
                f"{self.name} version {self.version}: {step} must return "
                "{output name: values}, one value per input row"
            )
        arrays = {}
        for name, values in outputs.items():
            column = np.asarray(values)
            if column.ndim == 0 or len(column) != rows:
                got = "a scalar" if column.ndim == 0 else f"{len(column)} rows"
                raise OutputMismatch(
                    f"{self.name} version {self.version}: {step} returned {got} of output "
                    f"{name!r} for {rows} input rows; each output needs one entry per row"
                )
            arrays[str(name)] = column
        return arrays

    @classmethod
    def from_estimator(
        cls, name: str, version: str, estimator: Any, metadata: Mapping[str, Any]
    ) -> LoadedModel:
        """An in-memory scikit-learn estimator (custom code, tests), served like a file."""
        runtime = EstimatorRuntime(estimator, metadata)
        return cls(name, version, runtime, runtime.load(), metadata)


class EstimatorRuntime(Runtime):
    """A fitted estimator held in memory: `predict`, and `predict_proba` for a classifier."""

    name = "sklearn"

    def __init__(self, estimator: Any, metadata: Mapping[str, Any]) -> None:
        super().__init__(Path(), metadata)
        self.estimator = estimator

    def load(self) -> Signature:
        n = int(self.metadata.get("n_features", -1))
        outputs = [Tensor("predict", "FP64", (-1,))]
        if self.metadata.get("task") == "classification":
            outputs.append(Tensor("predict_proba", "FP64", (-1, -1)))
        return Signature((Tensor("features", "FP64", (-1, n)),), tuple(outputs))

    def predict(self, batch: np.ndarray) -> Mapping[str, Any]:
        outputs = {"predict": self.estimator.predict(batch)}
        if self.metadata.get("task") == "classification":
            outputs["predict_proba"] = self.estimator.predict_proba(batch)
        return outputs


#: Loads one version: (name, version) -> LoadedModel (hueyserve.worker.repository).
Loader = Callable[[str, str], LoadedModel]


class ModelRegistry:
    """Per-process model cache in front of a loader; safe across worker threads."""

    def __init__(self, loader: Loader, *, max_loaded: int = 8) -> None:
        self.loader = loader
        # Active versions are held apart, so many models or requests to old versions never
        # evict one in use; other versions share a small LRU.
        self._active: dict[tuple[str, str], LoadedModel] = {}
        self._loaded: LRUCache[tuple[str, str], LoadedModel] = LRUCache(maxsize=max_loaded)
        self._pinned: dict[tuple[str, str], LoadedModel] = {}
        #: versions that failed to load: when to try again
        self._failed: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: str) -> LoadedModel:
        """The model `name` at `version`, loading it if this process has not yet."""
        check_name_and_version(name, version)  # both came through Redis: never a path out
        key = (name, version)
        with self._lock:  # one load at a time: a forest takes ~0.2 s and lots of memory
            model = self._pinned.get(key) or self._active.get(key) or self._loaded.get(key)
            if model is None:
                model = self.loader(name, version)
                self._loaded[key] = model
            return model

    def keep_active(self, active: set[tuple[str, str]]) -> None:
        """Hold these (name, version) pairs loaded, loading those that are not; versions no
        longer active go back to the LRU."""
        with self._lock:
            # Newly active ones first: moving the others back into the LRU could evict them.
            for key in active - set(self._active) - set(self._pinned):
                if key in self._loaded:
                    self._active[key] = self._loaded.pop(key)
                    continue
                if time.monotonic() < self._failed.get(key, 0.0):
                    continue  # failed lately: not fetched again every heartbeat
                try:
                    self._active[key] = self.loader(*key)
                except Exception as exc:  # its requests fail with the reason; others go on
                    if key not in self._failed:
                        logger.error("%s version %s does not load here: %s", *key, exc)
                    self._failed[key] = time.monotonic() + RETRY_LOAD_S
            for key in set(self._active) - active:
                self._loaded[key] = self._active.pop(key)

    def forget(self, name: str, version: str | None = None) -> None:
        """Drop a deleted model's (or version's) loaded copies."""
        with self._lock:
            for table in (self._active, self._loaded):
                for key in [k for k in table if k[0] == name and version in (None, k[1])]:
                    del table[key]

    def register(self, model: LoadedModel) -> None:
        """Serve an in-memory model (custom code, tests) alongside the catalog's."""
        with self._lock:
            self._pinned[(model.name, model.version)] = model

    def loaded(self) -> list[str]:
        """Every loaded version as "name:version" (for the heartbeat); [] while a load holds
        the lock for long, rather than delay the beat."""
        if not self._lock.acquire(timeout=0.2):
            return []
        try:
            keys = {*self._active, *self._loaded.keys(), *self._pinned}
        finally:
            self._lock.release()
        return sorted(f"{name}:{version}" for name, version in keys)

    def in_memory_names(self) -> set[str]:
        with self._lock:
            return {name for name, _ in self._pinned}

    def unregister(self, name: str) -> None:
        with self._lock:
            for key in [k for k in self._pinned if k[0] == name]:
                del self._pinned[key]

    def clear(self) -> None:
        """Forget every model (tests; a store pointed elsewhere)."""
        with self._lock:
            self._active.clear()
            self._loaded.clear()
            self._pinned.clear()
