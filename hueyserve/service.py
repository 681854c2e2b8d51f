"""What the API does for a request: validate against the model, answer from cache or enqueue,
wait for the result, read jobs, report health. main.py only maps HTTP onto this.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from huey.api import TaskWrapper
from huey.constants import EmptyData
from huey.utils import Error

from hueyserve import heartbeat
from hueyserve.cache import PredictionCache, cache_key
from hueyserve.catalog import ActiveModel, ModelCatalog
from hueyserve.errors import (
    InvalidInput,
    JobNotFound,
    PayloadTooLarge,
    PredictionFailed,
    PredictTimeout,
    RedisUnavailable,
    ResultUnavailable,
    ServiceError,
)
from hueyserve.jobs import JobStatus, new_record
from hueyserve.queue import TaskQueue, redis_errors
from hueyserve.schemas import JobAccepted, JobPublic
from hueyserve.settings import Settings

FLOAT32_MAX = float(np.finfo(np.float32).max)
ENDED = (JobStatus.DONE, JobStatus.FAILED)


@dataclass(frozen=True)
class Prediction:
    """A sync answer and where it came from."""

    predictions: list[Any]
    model: ActiveModel
    cached: bool
    job_id: str | None = None


class PredictService:
    """One per API process; holds the cache, the catalog view and the queue client."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: TaskQueue,
        catalog: ModelCatalog,
        cache: PredictionCache,
        task: TaskWrapper,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.cache = cache
        self.task = task
        self.enqueued = 0  # tasks this process put on the queue (cache hits put none)

    # --- predict --------------------------------------------------------------------------

    def validate(self, name: str, instances: list[list[float]]) -> tuple[ActiveModel, np.ndarray]:
        """The active model and the rows as a float array, or the 4xx that says what to fix."""
        model = self.catalog.get(name)
        if len(instances) > self.settings.max_instances:
            raise PayloadTooLarge(
                f"{len(instances)} instances in one request; the limit is "
                f"{self.settings.max_instances} (HUEYSERVE_MAX_INSTANCES): split the request"
            )
        expected = model.n_features
        for index, row in enumerate(instances):
            if len(row) != expected:
                names = f" ({', '.join(model.features)})" if model.features else ""
                raise InvalidInput(
                    f"instances[{index}] has {len(row)} features; model {name!r} "
                    f"expects {expected}{names}"
                )
        features = np.asarray(instances, dtype=np.float64)
        if np.abs(features).max() > FLOAT32_MAX:  # scikit-learn computes in float32
            raise InvalidInput(f"a feature value is beyond ±{FLOAT32_MAX:.3g}; scale the input")
        return model, features

    async def predict(
        self,
        name: str,
        instances: list[list[float]],
        *,
        priority: int | None,
        timeout_s: float | None,
    ) -> Prediction:
        """Answer at once from cache, or enqueue and wait for the worker's result."""
        model, features = self.validate(name, instances)
        key = cache_key(model.name, model.version, features)
        cached = self.cache.get(key)
        if cached is not None:
            return Prediction(cached, model, cached=True)
        wait_s = self._timeout(timeout_s)
        job_id = await self._enqueue(model, instances, _or(priority, self.settings.sync_priority))
        try:
            if not await self.queue.wait(job_id, wait_s):
                raise PredictTimeout(job_id, wait_s)
            value = await self.queue.result(job_id)
        except RedisUnavailable as exc:  # accepted already: say where to find it, not "retry"
            raise ResultUnavailable(job_id, exc.message) from exc
        if value is EmptyData:  # expired between the notification and the read
            raise PredictionFailed(job_id, "the result disappeared before it could be read")
        if isinstance(value, Error):
            raise PredictionFailed(job_id, str(value.metadata.get("error")))
        self.cache.put(key, value)
        return Prediction(value, model, cached=False, job_id=job_id)

    async def submit(
        self, name: str, instances: list[list[float]], *, priority: int | None
    ) -> JobAccepted:
        """Enqueue an async job and say where to find it."""
        model, _ = self.validate(name, instances)
        job_id = await self._enqueue(model, instances, _or(priority, self.settings.async_priority))
        return JobAccepted(
            job_id=job_id,
            status=JobStatus.QUEUED,
            location=f"/v1/jobs/{job_id}",
            model_name=model.name,
            model_version=model.version,
        )

    def _timeout(self, requested_s: float | None) -> float:
        limit = self.settings.predict_timeout_s
        if requested_s is not None and requested_s > limit:
            raise InvalidInput(
                f"timeout {requested_s:g}s is above the limit of {limit:g}s "
                "(HUEYSERVE_PREDICT_TIMEOUT_S); use async jobs for long waits"
            )
        return requested_s or limit

    async def _enqueue(
        self, model: ActiveModel, instances: list[list[float]], priority: int
    ) -> str:
        task = self.task.s(model.name, model.version, instances, priority=priority)
        task.id = str(uuid.uuid4())
        record = new_record(
            job_id=task.id,
            model=model.name,
            version=model.version,
            priority=priority,
            n_instances=len(instances),
        )
        await self.queue.enqueue(task, record)
        self.enqueued += 1
        return str(task.id)

    # --- jobs -----------------------------------------------------------------------------

    async def job(self, job_id: str) -> JobPublic:
        record, value = await self.queue.job(job_id)
        if not record and value is EmptyData:
            raise JobNotFound(job_id)
        # The result decides done/failed; the record tells queued/running (and a "done" record
        # whose result Huey has not stored yet is still running, for a moment).
        status = JobStatus(record.get("status", JobStatus.QUEUED.value))
        result = error = None
        if isinstance(value, Error):
            status, error = JobStatus.FAILED, record.get("error") or str(value.metadata["error"])
        elif value is not EmptyData:
            status, result = JobStatus.DONE, {"predictions": value}
        elif status is JobStatus.FAILED:
            error = record.get("error")
        elif status is JobStatus.DONE:
            status = JobStatus.RUNNING
        return JobPublic(
            job_id=job_id,
            status=status,
            model_name=record.get("model"),
            model_version=record.get("version"),
            priority=_int(record.get("priority")),
            instances=_int(record.get("instances")),
            attempts=_int(record.get("attempts")) or 0,
            created_at=_time(record.get("created_at")),
            started_at=_time(record.get("started_at")),
            finished_at=_time(record.get("finished_at")) if status in ENDED else None,
            result=result,
            error=error if status is JobStatus.FAILED else None,
        )

    # --- health ---------------------------------------------------------------------------

    async def readiness(self) -> list[str]:
        """Why this server is not ready; an empty list means ready."""
        reasons = []
        try:
            await self.queue.ping_ms()
            if not await self.workers():
                reasons.append("no worker has reported in: start `huey_consumer core.huey`")
        except ServiceError as exc:
            reasons.append(exc.message)
        if not self.catalog.models:
            reasons.append("no model is loaded yet")
        return reasons

    async def workers(self) -> dict[str, float]:
        """Workers seen within the heartbeat TTL, with the age of their last beat in seconds."""
        now = time.time()
        async with redis_errors():
            beats: list[Any] = await self.queue.client.zrangebyscore(
                heartbeat.HEARTBEATS_KEY,
                now - self.settings.heartbeat_ttl_s,
                "+inf",
                withscores=True,
            )
        return {bytes(member).decode(): round(now - float(score), 3) for member, score in beats}

    async def details(self) -> dict[str, Any]:
        """Everything an operator wants on one page (GET /health)."""
        redis_info: dict[str, Any]
        try:
            redis_info = {
                "ok": True,
                "latency_ms": round(await self.queue.ping_ms(), 3),
                "queue_depth": await self.queue.depth(),
                "workers": await self.workers(),
            }
        except ServiceError as exc:
            redis_info = {"ok": False, "error": exc.message}
        return {
            "redis": redis_info,
            "models": {m.name: m.version for m in self.catalog.models.values()},
            "cache": self.cache.stats(),
            "enqueued": self.enqueued,
        }


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _int(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


def _time(raw: str | None) -> dt.datetime | None:
    return None if raw is None else dt.datetime.fromtimestamp(float(raw), tz=dt.UTC)
