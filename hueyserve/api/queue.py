"""The API's asyncio client for Huey's Redis storage: enqueue, wait for, and read tasks.

Huey's own client is synchronous and would block the event loop; this one speaks the same
storage format (Huey's serializer, its queue and result keys) over redis.asyncio with short
timeouts, so a Redis outage becomes a 503 in about a second instead of a hang. Waiting goes
through one ResultListener per process (hueyserve.api.waiting). Keys, scripts and the entry
layout come from hueyserve.wire, shared with the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis
from huey import Huey
from huey.api import Task
from huey.constants import EmptyData
from huey.utils import Error
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from hueyserve.api.waiting import ResultListener
from hueyserve.errors import (
    PredictionFailed,
    PredictTimeout,
    QueueFull,
    RedisUnavailable,
    ResultUnavailable,
)
from hueyserve.jobs import Fields, JobStatus
from hueyserve.wire import (
    CANCEL_SCRIPT,
    DOORBELL_TOKENS,
    ENQUEUE_SCRIPT,
    EVENTS_KEY,
    doorbell_key,
    idempotency_key,
    job_key,
    queue_entry,
    queue_score,
    revoke_id,
)

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def redis_errors() -> AsyncIterator[None]:
    """Turn any Redis or socket failure into the 503 the client should see."""
    try:
        yield
    except (redis.RedisError, OSError, TimeoutError) as exc:
        raise RedisUnavailable(exc) from exc


def fail_fast_retry() -> Retry:
    """One immediate retry on a dropped connection (a pooled socket gone stale after a Redis
    restart), none on timeouts: redis-py's default (10 retries, backoff up to 1 s) would turn
    an outage into multi-second hangs."""
    return Retry(NoBackoff(), retries=1, supported_errors=(redis.ConnectionError,))


UNREADABLE = (
    "the stored result cannot be read: it fails its signature check (HUEYSERVE_SECRET differs "
    "between API and workers?), was written for another job, or is corrupt"
)


POLL_S = 0.05  #: `wait_stored`'s first pause between looks for a result...
POLL_MAX_S = 0.5  #: ...doubled up to this
CANCELLED, EXPIRED = JobStatus.CANCELLED.value, JobStatus.EXPIRED.value


def _outcome(job_id: str, value: Any, timeout_s: float) -> Any:
    """A stored result as the waiter's answer, or its error or timeout as a ServiceError."""
    if value is EmptyData:
        raise PredictTimeout(job_id, timeout_s)
    if isinstance(value, Error):
        raise PredictionFailed(job_id, str(value.metadata.get("error")))
    return value


class TaskQueue:
    """Enqueue Huey tasks with their job record, and wait for their results, without threads."""

    def __init__(
        self,
        huey: Huey,
        *,
        url: str,
        connect_timeout_s: float,
        socket_timeout_s: float,
        record_ttl_s: int,
        max_waiters: int,
        max_connections: int,
        pool_timeout_s: float,
        max_depth: int = 0,
        events_max_len: int = 100_000,
    ) -> None:
        self.huey = huey
        self.events_max_len = events_max_len
        self.storage = huey.storage
        self.enqueued = 0  #: tasks this process put on the queue (cache hits put none)
        self.record_ttl_s = record_ttl_s
        self.max_depth = max_depth
        self.max_connections = max_connections
        # All requests share a few connections; when they are busy, a request waits for one
        # (a burst of a thousand requests keeps the event loop busy for a while) instead of
        # failing at once as redis-py's default pool does past its limit.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=fail_fast_retry(),
        )
        self.client = aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes it
        # The result subscription gets a connection without a read timeout: under a burst the
        # event loop can be busy for longer than a second, and a timed-out read would drop the
        # subscription (and fail every waiting request) though nothing is wrong.
        # No silent reconnect either (redis-py would re-subscribe inside get_message and hide
        # the gap): the listener must see the failure and fail the requests it left waiting.
        self.subscriber = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), retries=0),
        )
        self.results = ResultListener(self.subscriber, max_waiting=max_waiters)
        self._enqueue = self.client.register_script(ENQUEUE_SCRIPT)
        self._cancel = self.client.register_script(CANCEL_SCRIPT)

    async def warm(self) -> None:
        """Open the pool's connections now. Opened during a burst instead, they would race
        their connect timeout against an event loop busy with a thousand requests, and lose."""
        async with redis_errors():
            await asyncio.gather(*(self.client.ping() for _ in range(self.max_connections)))

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.subscriber.aclose()

    def reply_to(self, task_id: str) -> str:
        """Expect `task_id`'s result (call before enqueueing); the channel to name in it."""
        self.results.expect(task_id)
        return self.results.channel

    async def enqueue(
        self,
        task: Task,
        records: dict[str, Fields],
        client_key: str | None = None,
        ttl_s: int | None = None,
    ) -> str:
        """Put `task` on Huey's priority queue with its job records (one, or one per request
        of a group), atomically, and answer its id; or, for an Idempotency-Key (`client_key`)
        seen before,
        queue nothing and answer the earlier job's id. QueueFull when
        HUEYSERVE_MAX_QUEUE_DEPTH tasks would run before or with it."""
        if task.expires:
            task.resolve_expires(self.huey.utc)  # as huey.enqueue does
        entry = queue_entry(self.huey.serialize_task(task))
        ttl = ttl_s or self.record_ttl_s  # of the records (and of the idempotency key)
        args: list[Any] = [self.max_depth, queue_score(task.priority), entry, ttl]
        args += [task.id, DOORBELL_TOKENS, time.time(), self.events_max_len]
        for record in records.values():
            args.append(len(record))
            for field, value in record.items():
                args += [field, value]
        idempotency = idempotency_key(client_key) if client_key else ""
        doorbell = doorbell_key(self.storage.queue_key)
        keys = [self.storage.queue_key, idempotency, doorbell, EVENTS_KEY]
        keys += map(job_key, records)
        async with redis_errors():
            job_id = await self._enqueue(keys=keys, args=args)
        if not job_id:
            raise QueueFull(self.max_depth, task.priority or 0)
        held = bytes(job_id).decode()
        if held == task.id:  # else an earlier submission with the same key holds
            self.enqueued += 1
        return held

    async def cancel(self, task_id: str) -> str | None:
        """Revoke a queued task (Huey skips it when a worker takes it); the status the job
        had (None: no such job). Only a `queued` job is cancelled."""
        revoke_once = self.huey.serializer.serialize((None, True))
        keys = [job_key(task_id), self.storage.result_key(revoke_id(task_id)), EVENTS_KEY]
        args = [time.time(), revoke_once, self.record_ttl_s, self.events_max_len]
        async with redis_errors():
            status = await self._cancel(keys=keys, args=args)
        return None if status is None else bytes(status).decode()

    async def wait(self, job_id: str, timeout_s: float) -> Any:
        """The result of a job announced with `reply_to` once stored; its error or a timeout
        as the matching ServiceError."""
        try:
            payload = await self.results.wait(job_id, timeout_s)
            if payload is None:
                value = await self.result(job_id)  # a last look, in case the wake-up was missed
            else:
                value = self._load(job_id, payload)
        except RedisUnavailable as exc:  # accepted already: say where to find it, not "retry"
            raise ResultUnavailable(job_id, exc.message) from exc
        return _outcome(job_id, value, timeout_s)

    async def wait_stored(self, job_id: str, timeout_s: float) -> tuple[dict[str, str], Any]:
        """The record and result of a job another process enqueued (its wake-up goes there),
        looked for with a growing pause (POLL_S up to POLL_MAX_S); a job that ended without
        a result (cancelled, expired) or a timeout as the matching ServiceError."""
        deadline, pause = time.monotonic() + timeout_s, POLL_S
        try:
            while True:
                record, value = await self.job(job_id)
                status = record.get("status")
                if value is not EmptyData or status in (CANCELLED, EXPIRED):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, POLL_MAX_S)
        except RedisUnavailable as exc:
            raise ResultUnavailable(job_id, exc.message) from exc
        if value is EmptyData and status in (CANCELLED, EXPIRED):
            raise PredictionFailed(job_id, record.get("error") or f"the job was {status}")
        return record, _outcome(job_id, value, timeout_s)

    async def result(self, task_id: str) -> Any:
        """The stored result (a value, or huey's `Error`), or EmptyData when there is none."""
        async with redis_errors():
            raw = await self.client.get(self.storage.result_key(task_id))
        return EmptyData if raw is None else self._load(task_id, raw)

    async def job(self, task_id: str) -> tuple[dict[str, str], Any]:
        """The job record (empty when unknown) and the result (EmptyData when none yet)."""
        async with redis_errors(), self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(job_key(task_id))
            pipe.get(self.storage.result_key(task_id))
            record, raw = await pipe.execute()
        fields = {k.decode(): v.decode() for k, v in record.items()}
        return fields, EmptyData if raw is None else self._load(task_id, raw)

    def _load(self, job_id: str, raw: bytes | str) -> Any:
        """A stored result (a value, or huey's `Error`), JSON and never pickle; one that does
        not read (it fails the signature check, belongs to another job, or is corrupt) reads
        as an Error saying so."""
        try:
            return self.huey.serializer.load_result(job_id, raw)
        except Exception:
            logger.warning(
                "the stored result of job %s cannot be read (%d bytes)", job_id, len(raw)
            )
            return Error({"error": UNREADABLE})

    async def queued_entries(self) -> list[bytes]:
        """Every task waiting in the queue, as stored (for an admin purge)."""
        async with redis_errors():
            entries: list[Any] = await self.client.zrange(self.storage.queue_key, 0, -1)
        return [bytes(entry) for entry in entries]

    async def remove_entry(self, entry: bytes) -> None:
        async with redis_errors():
            await self.client.zrem(self.storage.queue_key, entry)
