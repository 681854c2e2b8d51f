"""Jobs in the API process: submit async predictions and trainings, make a version active,
read, cancel and purge jobs."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

import numpy as np
from huey.api import TaskWrapper
from huey.constants import EmptyData
from huey.utils import Error

from hueyserve import metrics, training, wire
from hueyserve.api.catalog import ModelCatalog
from hueyserve.api.queue import TaskQueue, redis_errors
from hueyserve.api.schemas import JobAccepted, JobPublic, TrainRequest
from hueyserve.api.v1 import encode_predictions
from hueyserve.api.v2 import v2_response
from hueyserve.errors import Conflict, InvalidInput, JobNotFound, PredictionFailed, ServiceError
from hueyserve.jobs import ENDED, RELOAD_PRIORITY, JobKind, JobStatus, new_record
from hueyserve.models import ModelVersion
from hueyserve.settings import Settings

logger = logging.getLogger(__name__)

MALFORMED = "the job's record or result in Redis is malformed (altered by hand?)"


class JobService:
    """One per API process: every job that is not a sync prediction."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: TaskQueue,
        catalog: ModelCatalog,
        predict_task: TaskWrapper,
        train_task: TaskWrapper,
        reload_task: TaskWrapper,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.predict_task = predict_task
        self.train_task = train_task
        self.reload_task = reload_task

    async def submit(
        self,
        model: ModelVersion,
        features: np.ndarray,
        *,
        priority: int | None,
        deadline_s: float | None = None,
        protocol: str = "v1",
        idempotency_key: str | None = None,
    ) -> JobAccepted:
        """Enqueue an async predict job and say where to find it. Past `deadline_s` seconds
        in the queue, it is not run and reads `expired`. A submission repeated with the same
        `idempotency_key` gets the first one's job instead of a second job."""
        priority = self.settings.async_priority if priority is None else priority
        job_id = await self.enqueue(
            self.predict_task, (model.name, model.version, features), JobKind.PREDICT,
            model.name, priority, expires=deadline_s, idempotency_key=idempotency_key,
            version=model.version, instances=len(features), protocol=protocol,
        )  # fmt: skip
        return accepted(job_id, model.name, model.version)

    async def train(
        self, name: str, request: TrainRequest, idempotency_key: str | None = None
    ) -> JobAccepted:
        """Plan and check a training job (bad parameters: 422), then queue it low."""
        entry = self.catalog.models.get(name)
        previous = entry.get().metadata if entry else None
        try:
            plan = training.plan(
                previous, **request.plan_fields(), data_dir=self.settings.dataset_dir
            )
        except training.TrainingError as exc:
            raise InvalidInput(str(exc)) from exc
        job_id = await self.enqueue(
            self.train_task, (name, plan), JobKind.TRAIN, name, self.settings.train_priority,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return accepted(job_id, name, None)

    async def reload(self, name: str, version: str | None) -> dict[str, Any]:
        """Make `version` (or the newest) active now, through a worker that loads it first."""
        entry = self.catalog.entry(name)
        if version is not None:
            entry.get(version)  # 404 for a version nobody published
        job_id = await self.enqueue(
            self.reload_task, (name, version), JobKind.RELOAD, name, RELOAD_PRIORITY, wait=True
        )
        try:
            result: dict[str, Any] = await self.queue.wait(job_id, self.settings.predict_timeout_s)
        except PredictionFailed as exc:
            raise Conflict(exc.message) from exc
        # This process answers with the new version from its next request on, without waiting
        # for the pub/sub message (other API processes get it within milliseconds).
        async with redis_errors():
            await self.catalog.resync()
        return {**result, "job_id": job_id}

    async def enqueue(
        self,
        wrapper: TaskWrapper,
        args: tuple[Any, ...],
        kind: JobKind,
        model: str,
        priority: int,
        *,
        wait: bool = False,
        expires: float | None = None,
        idempotency_key: str | None = None,
        **extra: str | int | float,
    ) -> str:
        """Enqueue a task with its job record; with `wait`, the caller must wait for it."""
        job_id = str(uuid.uuid4())
        reply = {"reply_to": self.queue.reply_to(job_id)} if wait else {}
        task = wrapper.s(*args, priority=priority, **reply)
        task.id, task.expires = job_id, expires
        record = new_record(job_id=job_id, kind=kind, model=model, priority=priority, **extra)
        try:
            held = await self.queue.enqueue(task, {job_id: record}, idempotency_key)
        except BaseException:
            self.queue.results.forget(job_id)
            raise
        if held == job_id:  # else an earlier submission with the same key holds
            metrics.JOBS.labels(kind.value, "submitted").inc()
        return held

    async def cancel(self, job_id: str) -> JobPublic:
        """Revoke a queued job: it will never run. 409 once it runs or has ended."""
        status = await self.queue.cancel(job_id)
        if status is None:
            raise JobNotFound(job_id)
        if status != JobStatus.QUEUED.value:
            raise Conflict(f"job {job_id} is {status}; only a queued job can be cancelled")
        job = await self.job(job_id)
        metrics.JOBS.labels(job.kind, JobStatus.CANCELLED.value).inc()
        return job

    async def purge(self) -> dict[str, int]:
        """Cancel every queued job (admin): none of them will run, and their tasks leave the
        queue. A sync caller whose job is purged gets its 504 when its wait ends."""
        cancelled = 0
        for entry in await self.queue.queued_entries():
            try:
                task = self.queue.huey.deserialize_task(wire.message_of(entry))
            except Exception:  # not ours (unsigned, corrupt): the workers drop it anyway
                continue
            statuses = [await self.queue.cancel(job_id) for job_id in wire.job_ids(task)]
            cancelled += statuses.count(JobStatus.QUEUED.value)
            await self.queue.remove_entry(entry)
        return {"cancelled": cancelled}

    async def job(self, job_id: str) -> JobPublic:
        record, value = await self.queue.job(job_id)
        if not record and value is EmptyData:
            raise JobNotFound(job_id)
        try:
            return job_public(job_id, record, value, self.catalog)
        except (TypeError, ValueError, KeyError, AttributeError):  # altered in Redis
            logger.warning("job %s: its record or result in Redis is malformed", job_id)
            return job_public(job_id, {}, Error({"error": MALFORMED}), self.catalog)


def job_public(job_id: str, record: dict[str, str], value: Any, catalog: ModelCatalog) -> JobPublic:
    """What GET /v1/jobs/{id} says of a job record and its stored result (or EmptyData).
    The result decides done/failed; the record tells queued/running (and a "done" record whose
    result Huey has not stored yet is still running, for a moment)."""
    status = JobStatus(record.get("status", JobStatus.QUEUED.value))
    result = error = None
    if isinstance(value, Error):
        status, error = JobStatus.FAILED, record.get("error") or str(value.metadata["error"])
    elif value is not EmptyData:
        status, result = JobStatus.DONE, job_result(record, value, catalog)
    elif status in (JobStatus.FAILED, JobStatus.EXPIRED):
        error = record.get("error")
    elif status is JobStatus.DONE:
        status = JobStatus.RUNNING
    return JobPublic(
        job_id=job_id,
        kind=record.get("kind", JobKind.PREDICT.value),
        status=status,
        model_name=record.get("model"),
        model_version=record.get("version"),
        priority=_int(record.get("priority")),
        instances=_int(record.get("instances")),
        attempts=_int(record.get("attempts")) or 0,
        worker=record.get("worker"),
        created_at=_time(record.get("created_at")),
        started_at=_time(record.get("started_at")),
        finished_at=_time(record.get("finished_at")) if status in ENDED else None,
        stage=record.get("stage"),
        progress=_fraction(record.get("progress")),
        result=result,
        error=error if status in (JobStatus.FAILED, JobStatus.EXPIRED) else None,
    )


def job_result(record: dict[str, str], value: Any, catalog: ModelCatalog) -> dict[str, Any]:
    """A predict job's outputs in the protocol it was submitted with; other kinds as is."""
    if record.get("kind", JobKind.PREDICT.value) != JobKind.PREDICT.value:
        return dict(value)
    name, version = record.get("model"), record.get("version")
    if name is None or version is None:  # the record is gone (deleted, evicted, expired)
        return {"outputs": value}
    try:
        model = catalog.get(name, version)
    except ServiceError:  # the version is gone from the catalog: give the raw outputs
        return {"outputs": value}
    if record.get("protocol") == "v2":
        return v2_response(model, value, request_id=None).model_dump(exclude_none=True)
    return {"predictions": encode_predictions(model, value)}


def accepted(job_id: str, model: str, version: str | None) -> JobAccepted:
    return JobAccepted(
        job_id=job_id,
        status=JobStatus.QUEUED,
        location=f"/v1/jobs/{job_id}",
        model_name=model,
        model_version=version,
    )


def _int(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


def _fraction(raw: str | None) -> float | None:
    return None if raw is None else min(max(float(raw), 0.0), 1.0)


def _time(raw: str | None) -> dt.datetime | None:
    return None if raw is None else dt.datetime.fromtimestamp(float(raw), tz=dt.UTC)
