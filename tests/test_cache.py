"""The prediction cache: canonical keys, LRU eviction, hit/miss counters."""

from __future__ import annotations

import numpy as np

from hueyserve.cache import PredictionCache, cache_key


def test_key_is_canonical_and_versioned() -> None:
    ints = cache_key("m", "1", np.asarray([[1, 2]]))
    floats = cache_key("m", "1", np.asarray([[1.0, 2.0]]))
    assert ints == floats
    assert cache_key("m", "2", np.asarray([[1.0, 2.0]])) != floats
    assert cache_key("m", "1", np.asarray([[1.0], [2.0]])) != floats  # shape matters


def test_lru_evicts_oldest_and_counts() -> None:
    cache = PredictionCache(maxsize=2, where="api")
    keys = [cache_key("m", "1", np.asarray([[float(i)]])) for i in range(3)]
    for i, key in enumerate(keys):
        cache.put(key, [i])
    assert cache.get(keys[0]) is None
    assert cache.get(keys[2]) == [2]
    assert cache.stats() == {"size": 2, "maxsize": 2, "hits": 1, "misses": 1, "hit_rate": 0.5}


def test_zero_size_turns_the_cache_off() -> None:
    cache = PredictionCache(maxsize=0, where="api")
    key = cache_key("m", "1", np.asarray([[1.0]]))
    cache.put(key, [1])
    assert cache.get(key) is None and cache.stats()["size"] == 0


def test_a_first_look_counts_its_hit_but_not_its_miss() -> None:
    cache = PredictionCache(4, where="api")
    key = cache_key("m", "1", np.zeros((1, 2)))
    assert cache.get(key, count_miss=False) is None
    cache.put(key, [0])
    assert cache.get(key, count_miss=False) == [0]
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 0)
