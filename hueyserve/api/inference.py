"""Sync inference in the API process: answer from the cache, coalesce identical requests in
flight, group the misses into tasks, and wait for the workers' answers.

A cache miss travels: `infer` (cache, coalescing) -> `_run_job` -> the Grouper
(hueyserve.api.grouping) -> `_send_group` -> TaskQueue.enqueue (hueyserve.api.queue) -> a
worker -> the ResultListener (hueyserve.api.waiting) -> back here.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import numpy as np
from huey.api import TaskWrapper

from hueyserve import metrics, wire
from hueyserve.api.grouping import Grouper, GroupKey, Member
from hueyserve.api.queue import TaskQueue
from hueyserve.cache import CacheKey, PredictionCache, cache_key
from hueyserve.errors import (
    Conflict,
    InvalidInput,
    PredictTimeout,
    QueueFull,
    ServiceUnavailable,
)
from hueyserve.jobs import JobKind, new_record
from hueyserve.models import ModelVersion, Outputs
from hueyserve.settings import Settings


@dataclass(frozen=True)
class Prediction:
    """A sync answer and where it came from: `source` is hit (the API's cache), miss (a task
    of its own), coalesced (shared the task of an identical request in flight) or repeat (the
    job of an earlier call with the same Idempotency-Key)."""

    outputs: Outputs
    model: ModelVersion
    source: str
    job_id: str | None = None


class InferenceService:
    """One per API process: sync predictions for every protocol."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: TaskQueue,
        cache: PredictionCache,
        predict_task: TaskWrapper,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.cache = cache
        self.predict_task = predict_task
        # Identical requests in flight share one job: cache key -> (job id, its answer).
        self._in_flight: dict[CacheKey, tuple[str, asyncio.Future[Outputs]]] = {}
        self.grouper = Grouper(
            self._send_group,
            max_rows=settings.batch_max_rows,  # a group is at most one batch
            max_in_flight=settings.group_max_in_flight,
        )

    async def infer(
        self,
        model: ModelVersion,
        features: np.ndarray,
        *,
        priority: int | None,
        timeout_s: float | None,
        client_key: str | None = None,
        protocol: str = "v1",
    ) -> Prediction:
        """Answer at once from cache, join an identical request in flight, or enqueue and wait
        for the worker's result; with an Idempotency-Key (`client_key`), see `infer_once`."""
        if client_key is not None:
            return await self.infer_once(
                model, features, priority=priority, timeout_s=timeout_s,
                client_key=client_key, protocol=protocol,
            )  # fmt: skip
        key = cache_key(model.name, model.version, features)
        cached = self.cache.get(key)
        if cached is not None:
            return Prediction(cached, model, "hit")
        wait_s = self.timeout(timeout_s)
        source = "coalesced"
        if key not in self._in_flight:  # no await before this entry exists: later ones join
            source, job_id = "miss", str(uuid.uuid4())
            priority = self.settings.sync_priority if priority is None else priority
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

    async def infer_once(
        self,
        model: ModelVersion,
        features: np.ndarray,
        *,
        priority: int | None,
        timeout_s: float | None,
        client_key: str,
        protocol: str = "v1",
    ) -> Prediction:
        """A sync request with an Idempotency-Key: a job of its own (no cache, no coalescing,
        no group), which a retry with the same key finds again (after a 504, or when the API
        process that took the first call died) instead of computing again."""
        wait_s = self.timeout(timeout_s)
        job_id = str(uuid.uuid4())
        priority = self.settings.sync_priority if priority is None else priority
        reply = wire.predict_options(self.queue.reply_to(job_id))
        task = self.predict_task.s(model.name, model.version, features, priority=priority, **reply)
        task.id = job_id  # no expiry: a retry may come for the answer after this wait ends
        record = new_record(
            job_id=job_id, kind=JobKind.PREDICT, model=model.name, priority=priority,
            version=model.version, instances=len(features), protocol=protocol,
        )  # fmt: skip
        try:
            held = await self.queue.enqueue(
                task, {job_id: record}, client_key, ttl_s=self.settings.sync_result_ttl_s
            )
        except BaseException as exc:
            self.queue.results.forget(job_id)
            if isinstance(exc, QueueFull):
                raise exc.overloaded() from None
            raise
        if held != job_id:  # the first call with this key holds: its answer is ours
            self.queue.results.forget(job_id)
            stored, value = await self.queue.wait_stored(held, wait_s)
            _check_same_request(stored, model, len(features))
            return Prediction(value, model, "repeat", held)
        metrics.JOBS.labels(JobKind.PREDICT.value, "submitted").inc()
        return Prediction(await self.queue.wait(job_id, wait_s), model, "miss", job_id)

    def timeout(self, requested_s: float | None) -> float:
        """How long a sync request waits: what it asked, within HUEYSERVE_PREDICT_TIMEOUT_S."""
        limit = self.settings.predict_timeout_s
        if requested_s is not None and requested_s > limit:
            raise InvalidInput(
                f"timeout {requested_s:g}s is above the limit of {limit:g}s "
                "(HUEYSERVE_PREDICT_TIMEOUT_S); use async jobs for long waits"
            )
        return requested_s or limit

    async def _run_job(
        self, model: ModelVersion, features: np.ndarray, priority: int, job_id: str, key: CacheKey
    ) -> Outputs:
        """Enqueue a predict job (in a group with its turn's other misses) and wait for it: the
        work that coalesced requests share."""
        try:
            self.queue.results.expect(job_id)
            member = self.grouper.add((model.name, model.version, priority), job_id, features)
            try:
                await member.enqueued
                value: Outputs = await self.queue.wait(job_id, self.settings.predict_timeout_s)
            finally:
                self.grouper.answered(member)
        finally:
            self.queue.results.forget(job_id)  # if never enqueued
            del self._in_flight[key]
        self.cache.put(key, value)
        return value

    async def _send_group(self, key: GroupKey, members: list[Member]) -> None:
        """One predict task for a group of sync requests; each keeps its own job record."""
        name, version, priority = key
        if len(members) == 1:
            features, parts = members[0].features, None
        else:
            features = np.concatenate([m.features for m in members])
            parts = [(m.job_id, len(m.features)) for m in members]
        options = wire.predict_options(self.queue.results.channel, parts)
        task = self.predict_task.s(name, version, features, priority=priority, **options)
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
            await self.queue.enqueue(task, records, ttl_s=self.settings.sync_result_ttl_s)
        except QueueFull as exc:
            raise exc.overloaded() from None  # a sync call gets a 503, a job submission a 429
        metrics.JOBS.labels(JobKind.PREDICT.value, "submitted").inc(len(members))


def _check_same_request(record: dict[str, str], model: ModelVersion, rows: int) -> None:
    """A repeated Idempotency-Key must name the same kind of request: a key first used for
    another model, version or row count (or a training) is a client's mistake, not a repeat."""
    first = (
        record.get("kind"),
        record.get("model"),
        record.get("version"),
        record.get("instances"),
    )
    if first != (JobKind.PREDICT.value, model.name, model.version, str(rows)):
        raise Conflict(
            "this Idempotency-Key was first used for another request "
            f"({first[0]} of model {first[1]} version {first[2]}, {first[3]} rows); "
            "use a new key for a new request"
        )


def _retrieve(answer: asyncio.Future[Outputs]) -> None:
    """Mark a shared answer's error as seen, even when no identical request joined."""
    if not answer.cancelled():
        answer.exception()
