"""The prediction LRU shared by the API (before enqueueing) and each worker (before computing).

Keys are (model, version, canonical input): the input as a float64 array's shape and bytes, so
`1` and `1.0` hit the same entry (a text model's: its strings), and a new model version can
never hit an old answer.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any

import numpy as np
from cachetools import LRUCache

from hueyserve import metrics

CacheKey = tuple[Hashable, ...]


def cache_key(model: str, version: str, features: np.ndarray) -> CacheKey:
    if features.dtype.kind == "U":  # a text model's rows: the strings themselves
        return (model, version, "text", tuple(features.tolist()))
    canonical = np.ascontiguousarray(features, dtype=np.float64)
    return (model, version, canonical.shape, canonical.tobytes())


class PredictionCache:
    """A thread-safe LRU with hit and miss counters; `maxsize=0` turns it off."""

    def __init__(self, maxsize: int, *, where: str) -> None:
        self.maxsize = maxsize
        self._hit = metrics.CACHE_LOOKUPS.labels(where, "hit")
        self._miss = metrics.CACHE_LOOKUPS.labels(where, "miss")
        self._entries: LRUCache[CacheKey, Any] = LRUCache(maxsize=max(maxsize, 1))
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey, *, count_miss: bool = True) -> Any | None:
        """The cached value, or None. Hits are always counted; a first look that is followed
        by a second one on a miss (the answer cache, then the parsed input) passes
        `count_miss=False`, so one request counts one miss at most."""
        if self.maxsize == 0:
            return None
        with self._lock:
            value = self._entries.get(key)
        if value is not None:
            self.hits += 1
            self._hit.inc()
        elif count_miss:
            self.misses += 1
            self._miss.inc()
        return value

    def put(self, key: CacheKey, predictions: Any) -> None:
        if self.maxsize:
            with self._lock:
                self._entries[key] = predictions

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lookups = self.hits + self.misses
            return {
                "size": len(self._entries),
                "maxsize": self.maxsize,
                "hits": self.hits,
                "misses": self.misses,
                "hit_rate": round(self.hits / lookups, 4) if lookups else None,
            }
