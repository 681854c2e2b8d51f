"""How far a long job has come: its stages and fractions, into its record and the event
stream (hueyserve.worker.records), from the worker or from the training child itself.

A training reports `data loaded`, `fitting` (with a fraction where the estimator grows in
steps: tree ensembles, fitted a tenth of their trees at a time with `warm_start`, which gives
the same model as one fit), `scored`, `saved`, then in the worker `loaded` and `published`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from hueyserve.worker.records import JobRecorder

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5  #: fractions of one stage are reported at most this often
FIT_STEPS = 10  #: an ensemble is grown in this many steps


class Progress:
    """Reports one job's progress. Picklable (the training child gets a copy and opens its
    own connection); a failed report is logged and never fails the job."""

    def __init__(self, redis_url: str, job_id: str, *, ttl_s: int, events_max_len: int) -> None:
        self.redis_url = redis_url
        self.job_id = job_id
        self.ttl_s = ttl_s
        self.events_max_len = events_max_len
        self._recorder: JobRecorder | None = None
        self._last: tuple[str, float] = ("", 0.0)  # the last stage reported, and when

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_recorder": None}

    def __call__(self, stage: str, fraction: float | None = None) -> None:
        now = time.monotonic()
        last_stage, last_at = self._last
        if stage == last_stage and fraction not in (None, 1.0) and now - last_at < MIN_INTERVAL_S:
            return
        self._last = (stage, now)
        try:
            if self._recorder is None:
                conn = redis.Redis.from_url(self.redis_url, socket_timeout=5)
                self._recorder = JobRecorder(
                    conn, ttl_s=self.ttl_s, events_max_len=self.events_max_len
                )
            self._recorder.progress(self.job_id, stage, fraction)
        except redis.RedisError as exc:
            logger.warning("job %s: progress %r not reported: %s", self.job_id, stage, exc)


def fit(estimator: Any, x: Any, y: Any, report: Progress | None) -> None:
    """`estimator.fit(x, y)`, reporting the fraction done where the estimator can grow."""
    params = estimator.get_params()
    total = params.get("n_estimators")
    if report is None or not isinstance(total, int) or "warm_start" not in params:
        if report is not None:
            report("fitting")
        estimator.fit(x, y)
        if report is not None:
            report("fitting", 1.0)
        return
    warm = params["warm_start"]
    estimator.set_params(warm_start=True)
    try:
        report("fitting", 0.0)
        grown = 0
        for step in range(1, FIT_STEPS + 1):
            if (more := max(1, round(total * step / FIT_STEPS))) == grown:
                continue  # fewer trees than steps
            grown = more
            estimator.set_params(n_estimators=grown)
            estimator.fit(x, y)
            report("fitting", grown / total)
    finally:
        estimator.set_params(warm_start=warm, n_estimators=total)
