"""Models loaded in one worker process, by (name, version), loaded from the store on first use.

Tasks always name the exact version to use (the API resolved it), so a refresh that promotes a
new version never changes the answer of a task already queued for the old one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cachetools import LRUCache

from hueyserve.models import Outputs, check_name_and_version
from hueyserve.worker.store import ModelStore


@dataclass(frozen=True)
class LoadedModel:
    """An estimator ready to predict, with the metadata it was saved with."""

    name: str
    version: str
    estimator: Any
    metadata: dict[str, Any] = field(default_factory=dict)

    def predict(self, features: np.ndarray) -> Outputs:
        """Every output the model has, by name (see `fitting.describe`), one entry per row."""
        outputs: Outputs = {"predict": self.estimator.predict(features).tolist()}
        if self.metadata.get("task") == "classification":
            outputs["predict_proba"] = self.estimator.predict_proba(features).tolist()
        return outputs


class ModelRegistry:
    """Per-process model cache in front of a ModelStore; safe across worker threads."""

    def __init__(self, store: ModelStore, *, max_loaded: int = 8) -> None:
        self.store = store
        # Active versions are held apart, so many models or requests to old versions never
        # evict one in use; other versions share a small LRU.
        self._active: dict[tuple[str, str], LoadedModel] = {}
        self._loaded: LRUCache[tuple[str, str], LoadedModel] = LRUCache(maxsize=max_loaded)
        self._pinned: dict[tuple[str, str], LoadedModel] = {}
        self._lock = threading.Lock()

    def get(self, name: str, version: str) -> LoadedModel:
        """The model `name` at `version`, loading it from disk if this process has not yet."""
        check_name_and_version(name, version)  # both came through Redis: never a path out
        key = (name, version)
        with self._lock:  # one load at a time: a forest takes ~0.2 s and lots of memory
            model = self._pinned.get(key) or self._active.get(key) or self._loaded.get(key)
            if model is None:
                model = self._load(key)
                self._loaded[key] = model
            return model

    def keep_active(self, active: set[tuple[str, str]]) -> None:
        """Hold these (name, version) pairs loaded, loading those that are not; versions no
        longer active go back to the LRU."""
        with self._lock:
            # Newly active ones first: moving the others back into the LRU could evict them.
            for key in active - set(self._active) - set(self._pinned):
                self._active[key] = (
                    self._loaded.pop(key) if key in self._loaded else self._load(key)
                )
            for key in set(self._active) - active:
                self._loaded[key] = self._active.pop(key)

    def _load(self, key: tuple[str, str]) -> LoadedModel:
        name, version = key
        estimator = self.store.load(name, version)
        return LoadedModel(name, version, estimator, self.store.metadata(name, version))

    def register(self, model: LoadedModel) -> None:
        """Serve an in-memory model (custom code, tests) alongside the store's files."""
        with self._lock:
            self._pinned[(model.name, model.version)] = model

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
