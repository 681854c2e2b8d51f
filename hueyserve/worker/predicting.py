"""What the predict task computes: each job's outputs, from this worker's cache if seen, else
from a batched model call (hueyserve.worker.batching)."""

from __future__ import annotations

from typing import cast

import numpy as np

from hueyserve.cache import PredictionCache, cache_key
from hueyserve.worker.batching import Answer, Batchers


class Predictor:
    """One per worker process: its prediction cache in front of its batchers."""

    def __init__(self, cache: PredictionCache, batchers: Batchers) -> None:
        self.cache = cache
        self.batchers = batchers

    def answers(self, model: str, version: str, parts: list[np.ndarray]) -> list[Answer]:
        """Each part's outputs (or the error of its own rows), in order."""
        keys = [cache_key(model, version, rows) for rows in parts]
        answers: list[Answer | None] = [self.cache.get(key) for key in keys]
        missing = [i for i, answer in enumerate(answers) if answer is None]
        computed = self.batchers.predict_each(model, version, [parts[i] for i in missing])
        for i, answer in zip(missing, computed, strict=True):
            answers[i] = answer
            if not isinstance(answer, Exception):
                self.cache.put(keys[i], answer)
        return cast(list[Answer], answers)
