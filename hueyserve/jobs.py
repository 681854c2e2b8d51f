"""Job records: what happened to each task (predict, train, reload), kept in Redis beside
Huey's results.

Huey keeps only the result; a record adds status, timestamps, attempts and the last error, so
`GET /v1/jobs/{id}` can say `queued` or `running` before there is a result. The API writes the
record in the same transaction that enqueues the task; the worker updates it from Huey signals.
"""

from __future__ import annotations

import os
import socket
import time
from enum import StrEnum
from typing import Any

import redis

JOB_KEY_PREFIX = "hueyserve:job:"  #: + job id -> hash of the fields below, TTL = result TTL


class JobKind(StrEnum):
    """What a job does; the values are the names of the Huey tasks in core.py."""

    PREDICT = "predict"
    TRAIN = "train"
    RELOAD = "reload_model"


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"  #: waiting in the queue, or for its next retry
    RUNNING = "running"  #: a worker is computing it
    DONE = "done"  #: finished; the result is there to read
    FAILED = "failed"  #: gave up after its retries; `error` says why
    CANCELLED = "cancelled"  #: revoked while queued (DELETE /v1/jobs/{id}); never ran
    EXPIRED = "expired"  #: its deadline passed while it was queued; never ran


ENDED = (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.EXPIRED)


#: A record as redis-py takes it (its key type is a union, so spell it loosely).
Fields = dict[Any, str | int | float]


def job_key(job_id: str) -> str:
    return JOB_KEY_PREFIX + job_id


def new_record(
    *, job_id: str, kind: JobKind, model: str, priority: int, **extra: str | int | float
) -> Fields:
    """A queued job's record; `extra` adds what the kind needs (version, instances, ...)."""
    return {
        "id": job_id,
        "kind": kind.value,
        "model": model,
        "priority": priority,
        "status": JobStatus.QUEUED.value,
        "attempts": 0,
        "created_at": time.time(),
        **extra,
    }


#: KEYS: job records; ARGV: now, ttl, the worker (host:pid). Running, unless one of them was
#: cancelled or has ended already (then 0: a task queued again after its worker died may have
#: finished meanwhile).
START_SCRIPT = """
local ended = {cancelled = true, done = true, failed = true, expired = true}
for _, key in ipairs(KEYS) do
    if ended[redis.call('HGET', key, 'status')] then return 0 end
end
for _, key in ipairs(KEYS) do
    redis.call('HSET', key, 'status', 'running', 'started_at', ARGV[1], 'worker', ARGV[3])
    redis.call('HINCRBY', key, 'attempts', 1)
    redis.call('EXPIRE', key, ARGV[2])
end
return 1
"""

#: KEYS: the job record, Huey's revoke key for the task. ARGV: now, revoke value, ttl.
#: Cancels a queued job; answers the status it found (nil: no such job).
CANCEL_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'queued' then
    redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1])
    redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
end
return status
"""


class JobRecorder:
    """Worker-side updates of job records (synchronous Redis, from the predict task and Huey
    signals)."""

    def __init__(self, conn: redis.Redis, *, ttl_s: int) -> None:
        self.conn = conn
        self.ttl_s = ttl_s
        self._start = conn.register_script(START_SCRIPT)

    def start(self, *job_ids: str) -> bool:
        """Mark the jobs running (a group's all at once), unless one was cancelled or has
        ended: then nothing changes and the answer is False. Atomic against `cancel`."""
        keys = [job_key(job_id) for job_id in job_ids]
        worker = f"{socket.gethostname()}:{os.getpid()}"
        return bool(self._start(keys=keys, args=[time.time(), self.ttl_s, worker]))

    def expired(self, job_id: str) -> None:
        reason = "not run: its deadline passed while it was queued"
        self._update(job_id, {"status": JobStatus.EXPIRED.value, "error": reason})

    def done(self, job_id: str, pipe: redis.client.Pipeline | None = None, **fields: str) -> None:
        """Finished; `fields` adds what only the end tells (the version a training made).
        With `pipe`, the update joins that pipeline (the caller executes it)."""
        done: Fields = {"status": JobStatus.DONE.value, "finished_at": time.time(), **fields}
        self._update(job_id, done, pipe=pipe)

    def failed(self, job_id: str, error: str, pipe: redis.client.Pipeline | None = None) -> None:
        now = time.time()
        failed: Fields = {"status": JobStatus.FAILED.value, "error": error, "finished_at": now}
        self._update(job_id, failed, pipe=pipe)

    def retrying(self, job_id: str, error: str, pipe: redis.client.Pipeline | None = None) -> None:
        self._update(job_id, {"status": JobStatus.QUEUED.value, "error": error}, pipe=pipe)

    def _update(
        self,
        job_id: str,
        fields: Fields,
        attempts: int = 0,
        pipe: redis.client.Pipeline | None = None,
    ) -> None:
        key = job_key(job_id)
        own = pipe is None
        pipe = self.conn.pipeline(transaction=True) if pipe is None else pipe
        pipe.hset(key, mapping=fields)
        if attempts:
            pipe.hincrby(key, "attempts", attempts)
        pipe.expire(key, self.ttl_s)
        if own:
            pipe.execute()
