"""Job records: what happened to each task (predict, train, reload), kept in Redis beside
Huey's results.

Huey keeps only the result; a record adds status, timestamps, attempts and the last error, so
`GET /v1/jobs/{id}` can say `queued` or `running` before there is a result. The API writes the
record in the same transaction that enqueues the task; the worker updates it from Huey signals.
"""

from __future__ import annotations

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


class JobRecorder:
    """Worker-side updates of job records (synchronous Redis, from the predict task and Huey
    signals)."""

    def __init__(self, conn: redis.Redis, *, ttl_s: int) -> None:
        self.conn = conn
        self.ttl_s = ttl_s

    def running(self, *job_ids: str) -> None:
        """Started (all the jobs of a group at once, in one round trip)."""
        started: Fields = {"status": JobStatus.RUNNING.value, "started_at": time.time()}
        with self.conn.pipeline(transaction=True) as pipe:
            for job_id in job_ids:
                self._update(job_id, started, 1, pipe=pipe)
            pipe.execute()

    def done(self, job_id: str, pipe: redis.client.Pipeline | None = None, **fields: str) -> None:
        """Finished; `fields` adds what only the end tells (the version a training made).
        With `pipe`, the update joins that pipeline (the caller executes it)."""
        done: Fields = {"status": JobStatus.DONE.value, "finished_at": time.time(), **fields}
        self._update(job_id, done, pipe=pipe)

    def failed(self, job_id: str, error: str, pipe: redis.client.Pipeline | None = None) -> None:
        now = time.time()
        failed: Fields = {"status": JobStatus.FAILED.value, "error": error, "finished_at": now}
        self._update(job_id, failed, pipe=pipe)

    def retrying(self, job_id: str, error: str) -> None:
        self._update(job_id, {"status": JobStatus.QUEUED.value, "error": error})

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
