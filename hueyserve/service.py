"""What the API does for a request: validate against the model, answer from cache or enqueue,
wait for the result, read jobs, plan training and reloads, report health. main.py only maps
HTTP (v1 and v2) onto this.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from huey.api import TaskWrapper
from huey.constants import EmptyData
from huey.utils import Error

from hueyserve import heartbeat, metrics, training
from hueyserve.cache import CacheKey, PredictionCache, cache_key
from hueyserve.catalog import ModelCatalog, ModelVersion
from hueyserve.errors import (
    Conflict,
    InvalidInput,
    JobNotFound,
    PayloadTooLarge,
    PredictionFailed,
    PredictTimeout,
    QueueFull,
    RedisUnavailable,
    ResultUnavailable,
    ServiceError,
    ServiceUnavailable,
)
from hueyserve.gathering import Gatherer, GroupKey, Member
from hueyserve.jobs import ENDED, JobKind, JobStatus, new_record
from hueyserve.leases import PREFIX_BYTES
from hueyserve.queue import TaskQueue, redis_errors
from hueyserve.registry import Outputs
from hueyserve.schemas import JobAccepted, JobPublic, TrainRequest, v1_predictions
from hueyserve.settings import Settings
from hueyserve.v2_protocol import v2_response

FLOAT32_MAX = float(np.finfo(np.float32).max)
#: Model names: also directory names in the store, so nothing that could leave it.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_KEPT_BODY = 64 * 1024  #: larger v1 bodies are not kept as cache keys (hueyserve.hot_path)
RELOAD_PRIORITY = 100  # a reload is quick and someone waits for it
PRIORITY_LEVELS = range(101)  # every priority a request, job or periodic task can have


@dataclass(frozen=True)
class Tasks:
    """The Huey tasks the API enqueues (core.py defines them; tests may swap them)."""

    predict: TaskWrapper
    train: TaskWrapper
    reload: TaskWrapper


@dataclass(frozen=True)
class Prediction:
    """A sync answer and where it came from: `source` is hit (the API's cache), miss (a task
    of its own) or coalesced (shared the task of an identical request in flight)."""

    outputs: Outputs
    model: ModelVersion
    source: str
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
        tasks: Tasks,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.cache = cache
        self.tasks = tasks
        self.enqueued = 0  # tasks this process put on the queue (cache hits put none)
        # Identical requests in flight share one task: cache key -> (job id, its answer).
        self._in_flight: dict[CacheKey, tuple[str, asyncio.Future[Outputs]]] = {}
        self._priorities_seen: set[int] = set()
        # Sync misses that arrive together go to the workers as one task.
        self.gatherer = Gatherer(
            self._send_group,
            max_rows=settings.batch_max_rows,
            max_in_flight=settings.group_max_in_flight,
        )

    # --- predict --------------------------------------------------------------------------

    def rows(self, model: ModelVersion, instances: list[list[float]]) -> np.ndarray:
        """KServe v1 instances as a checked float array, or the 4xx that says what to fix."""
        self._check_count(len(instances))
        for index, row in enumerate(instances):
            if len(row) != model.n_features:
                raise InvalidInput(f"instances[{index}] has {len(row)} features; {_expects(model)}")
        return self.check(model, np.asarray(instances, dtype=np.float64))

    def check(self, model: ModelVersion, features: np.ndarray) -> np.ndarray:
        """A [rows, n_features] float64 array the model can take, or the 4xx saying why not."""
        if features.ndim != 2 or features.shape[1] != model.n_features:
            raise InvalidInput(f"got shape {list(features.shape)}; {_expects(model)}")
        self._check_count(features.shape[0])
        if features.size and np.abs(features).max() > FLOAT32_MAX:  # sklearn uses float32
            raise InvalidInput(f"a feature value is beyond ±{FLOAT32_MAX:.3g}; scale the input")
        if not np.isfinite(features).all():
            raise InvalidInput("NaN and Infinity are not allowed as feature values")
        return features

    def _check_count(self, rows: int) -> None:
        if rows > self.settings.max_instances:
            raise PayloadTooLarge(
                f"{rows} instances in one request; the limit is "
                f"{self.settings.max_instances} (HUEYSERVE_MAX_INSTANCES): split the request"
            )
        if rows == 0:
            raise InvalidInput("no instances: send at least one row")

    def cached_answer(self, model: ModelVersion, body: bytes) -> bytes | None:
        """A v1 answer rendered before for exactly this body, skipping parsing altogether."""
        return self.cache.peek(_answer_key(model, body))

    def keep_answer(self, model: ModelVersion, body: bytes, content: bytes) -> None:
        if len(body) <= MAX_KEPT_BODY:
            self.cache.put(_answer_key(model, body), content)

    async def infer(
        self,
        model: ModelVersion,
        features: np.ndarray,
        *,
        priority: int | None,
        timeout_s: float | None,
    ) -> Prediction:
        """Answer at once from cache, join an identical request in flight, or enqueue and wait
        for the worker's result."""
        key = cache_key(model.name, model.version, features)
        cached = self.cache.get(key)
        if cached is not None:
            return Prediction(cached, model, "hit")
        wait_s = self._timeout(timeout_s)
        source = "coalesced"
        if key not in self._in_flight:  # no await before this entry exists: later ones join
            source, job_id = "miss", str(uuid.uuid4())
            priority = _or(priority, self.settings.sync_priority)
            run = asyncio.ensure_future(self._run_job(model, features, priority, job_id, key))
            run.add_done_callback(_retrieve)
            self._in_flight[key] = (job_id, run)
        job_id, shared = self._in_flight[key]
        # Each request waits as long as it asked; the shared job waits as long as allowed, so a
        # short or cancelled request never cuts the wait of those that joined it.
        try:
            value = await asyncio.wait_for(asyncio.shield(shared), wait_s)
        except TimeoutError:
            record, _ = await self.queue.job(job_id)
            if not record:  # still held in a group here: there is no job to point to yet
                raise ServiceUnavailable(
                    f"no worker took the request within {wait_s:g}s; retry shortly"
                ) from None
            raise PredictTimeout(job_id, wait_s) from None
        return Prediction(value, model, source, job_id)

    async def _run_job(
        self, model: ModelVersion, features: np.ndarray, priority: int, job_id: str, key: CacheKey
    ) -> Outputs:
        """Enqueue a predict job (in a group with its turn's other misses) and wait for it: the
        work that identical requests share."""
        try:
            self.queue.results.expect(job_id)
            member = self.gatherer.add((model.name, model.version, priority), job_id, features)
            try:
                await member.enqueued
                value: Outputs = await self._wait(job_id, self.settings.predict_timeout_s)
            finally:
                self.gatherer.answered(member)
        finally:
            self.queue.results.forget(job_id)  # if never enqueued
            del self._in_flight[key]
        self.cache.put(key, value)
        return value

    async def _send_group(self, key: GroupKey, members: list[Member]) -> None:
        """One predict task for a group of sync requests; each keeps its own job record."""
        name, version, priority = key
        if len(members) == 1:
            features, extra = members[0].features, {}
        else:
            features = np.concatenate([m.features for m in members])
            extra = {"members": [(m.job_id, len(m.features)) for m in members]}
        task = self.tasks.predict.s(
            name, version, features, priority=priority, reply_to=self.queue.results.channel,
            **extra,
        )  # fmt: skip
        task.id = members[0].job_id
        task.expires = self.settings.predict_timeout_s  # then nobody waits: not worth running
        records = {
            m.job_id: new_record(
                job_id=m.job_id,
                kind=JobKind.PREDICT,
                model=name,
                priority=priority,
                version=version,
                instances=len(m.features),
                protocol="v1",
            )  # fmt: skip
            for m in members
        }
        try:
            await self.queue.enqueue(task, records)
        except QueueFull as exc:
            raise exc.overloaded() from None  # a sync call gets a 503, a job submission a 429
        self.enqueued += 1
        metrics.JOBS.labels(JobKind.PREDICT.value, "submitted").inc(len(members))

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
        job_id = await self._enqueue(
            self.tasks.predict, (model.name, model.version, features), JobKind.PREDICT,
            model.name, _or(priority, self.settings.async_priority), expires=deadline_s,
            idempotency_key=idempotency_key,
            version=model.version, instances=len(features), protocol=protocol,
        )  # fmt: skip
        return _accepted(job_id, model.name, model.version)

    def _timeout(self, requested_s: float | None) -> float:
        limit = self.settings.predict_timeout_s
        if requested_s is not None and requested_s > limit:
            raise InvalidInput(
                f"timeout {requested_s:g}s is above the limit of {limit:g}s "
                "(HUEYSERVE_PREDICT_TIMEOUT_S); use async jobs for long waits"
            )
        return requested_s or limit

    async def _enqueue(
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
        """Enqueue a task with its job record; with `wait`, the caller must `_wait` for it."""
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
            self.enqueued += 1
            metrics.JOBS.labels(kind.value, "submitted").inc()
        return held

    async def _wait(self, job_id: str, wait_s: float) -> Any:
        """The job's result once stored; its error or a timeout as the matching ServiceError."""
        try:
            value = await self.queue.wait(job_id, wait_s)
        except RedisUnavailable as exc:  # accepted already: say where to find it, not "retry"
            raise ResultUnavailable(job_id, exc.message) from exc
        if value is EmptyData:
            raise PredictTimeout(job_id, wait_s)
        if isinstance(value, Error):
            raise PredictionFailed(job_id, str(value.metadata.get("error")))
        return value

    # --- model life cycle -----------------------------------------------------------------

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
        priority = self.settings.train_priority
        job_id = await self._enqueue(
            self.tasks.train, (name, plan), JobKind.TRAIN, name, priority,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return _accepted(job_id, name, None)

    async def reload(self, name: str, version: str | None) -> dict[str, Any]:
        """Make `version` (or the newest) active now, through a worker that loads it first."""
        entry = self.catalog.entry(name)
        if version is not None:
            entry.get(version)  # 404 for a version nobody published
        job_id = await self._enqueue(
            self.tasks.reload, (name, version), JobKind.RELOAD, name, RELOAD_PRIORITY, wait=True
        )
        try:
            result: dict[str, Any] = await self._wait(job_id, self.settings.predict_timeout_s)
        except PredictionFailed as exc:
            raise Conflict(exc.message) from exc
        # This process answers with the new version from its next request on, without waiting
        # for the pub/sub message (other API processes get it within milliseconds).
        async with redis_errors():
            await self.catalog.resync()
        return {**result, "job_id": job_id}

    # --- jobs -----------------------------------------------------------------------------

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
                task = self.queue.huey.deserialize_task(entry[PREFIX_BYTES:])
            except Exception:  # not ours (unsigned, corrupt): the workers drop it anyway
                continue
            members = (task.kwargs or {}).get("members") or [(task.id, 0)]
            statuses = [await self.queue.cancel(job_id) for job_id, _ in members]
            cancelled += statuses.count(JobStatus.QUEUED.value)
            await self.queue.remove_entry(entry)
        return {"cancelled": cancelled}

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
            status, result = JobStatus.DONE, self._job_result(record, value)
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
            result=result,
            error=error if status in (JobStatus.FAILED, JobStatus.EXPIRED) else None,
        )

    def _job_result(self, record: dict[str, str], value: Any) -> dict[str, Any]:
        """A predict job's outputs in the protocol it was submitted with; other kinds as is."""
        if record.get("kind", JobKind.PREDICT.value) != JobKind.PREDICT.value:
            return dict(value)
        try:
            model = self.catalog.get(record["model"], record["version"])
        except ServiceError:  # the version is gone from the catalog: give the raw outputs
            return {"outputs": value}
        if record.get("protocol") == "v2":
            return v2_response(model, value, request_id=None).model_dump(exclude_none=True)
        return {"predictions": v1_predictions(model, value)}

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

    async def update_queue_depth(self) -> None:
        """Set the queue-depth gauge from Redis, a priority level at a time."""
        configured = {self.settings.sync_priority, self.settings.async_priority}
        levels = {*PRIORITY_LEVELS, *configured, self.settings.train_priority}
        depth = await self.queue.depth_by_priority(levels)
        for priority in self._priorities_seen - set(depth):
            metrics.QUEUE_DEPTH.labels(str(priority)).set(0)  # drained since the last scrape
        for priority, count in depth.items():
            metrics.QUEUE_DEPTH.labels(str(priority)).set(count)
        self._priorities_seen |= set(depth)

    async def model_ready(self) -> bool:
        """A published model is ready when some worker is alive to serve it."""
        try:
            return bool(await self.workers())
        except ServiceError:
            return False

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
            "models": {m.name: m.active for m in self.catalog.models.values()},
            "cache": self.cache.stats(),
            "enqueued": self.enqueued,
            "sync_waiting": self.queue.results.waiting,
        }


def _answer_key(model: ModelVersion, body: bytes) -> CacheKey:
    # Beside the parsed inputs' keys in the same LRU; the version keeps answers of an old one
    # from ever being served.
    return ("v1 body", model.name, model.version, body)


def _retrieve(answer: asyncio.Future[Outputs]) -> None:
    """Mark a shared answer's error as seen, even when no identical request joined."""
    if not answer.cancelled():
        answer.exception()


def _expects(model: ModelVersion) -> str:
    names = f" ({', '.join(model.features)})" if model.features else ""
    return f"model {model.name!r} expects {model.n_features} features per row{names}"


def _accepted(job_id: str, model: str, version: str | None) -> JobAccepted:
    return JobAccepted(
        job_id=job_id,
        status=JobStatus.QUEUED,
        location=f"/v1/jobs/{job_id}",
        model_name=model,
        model_version=version,
    )


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _int(raw: str | None) -> int | None:
    return None if raw is None else int(raw)


def _time(raw: str | None) -> dt.datetime | None:
    return None if raw is None else dt.datetime.fromtimestamp(float(raw), tz=dt.UTC)
