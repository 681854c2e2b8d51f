"""Worker-side updates of job records (synchronous Redis), as hueyserve.worker.lifecycle
decides them: running, done, failed, retrying, expired."""

from __future__ import annotations

import time
from typing import TypedDict, Unpack

import redis

from hueyserve.jobs import Fields, JobStatus
from hueyserve.wire import START_SCRIPT, job_key
from hueyserve.worker.heartbeat import worker_id


class Where(TypedDict, total=False):
    """Where an update goes: into `pipe` (the caller executes it; else at once), and the
    record's TTL from now (`ttl_s`; else the recorder's)."""

    pipe: redis.client.Pipeline
    ttl_s: int


class JobRecorder:
    """Writes the records of one worker process's jobs; each write renews the record's TTL
    (`ttl_s`, or the shorter one a sync request's job gets)."""

    def __init__(self, conn: redis.Redis, *, ttl_s: int) -> None:
        self.conn = conn
        self.ttl_s = ttl_s
        self._start = conn.register_script(START_SCRIPT)

    def start(self, *job_ids: str, ttl_s: int | None = None) -> bool:
        """Mark the jobs running (a group's all at once), unless one was cancelled or has
        ended: then nothing changes and the answer is False. Atomic against `cancel`."""
        keys = [job_key(job_id) for job_id in job_ids]
        ttl = ttl_s or self.ttl_s
        return bool(self._start(keys=keys, args=[time.time(), ttl, worker_id()]))

    def expired(self, job_id: str, **where: Unpack[Where]) -> None:
        reason = "not run: its deadline passed while it was queued"
        self._update(job_id, {"status": JobStatus.EXPIRED.value, "error": reason}, **where)

    def done(self, job_id: str, *, version: str | None = None, **where: Unpack[Where]) -> None:
        """Finished; `version` is what only the end tells (the version a training made)."""
        done: Fields = {"status": JobStatus.DONE.value, "finished_at": time.time()}
        if version is not None:
            done["version"] = version
        self._update(job_id, done, **where)

    def failed(self, job_id: str, error: str, **where: Unpack[Where]) -> None:
        now = time.time()
        failed: Fields = {"status": JobStatus.FAILED.value, "error": error, "finished_at": now}
        self._update(job_id, failed, **where)

    def retrying(self, job_id: str, error: str, **where: Unpack[Where]) -> None:
        queued: Fields = {"status": JobStatus.QUEUED.value, "error": error}
        self._update(job_id, queued, **where)

    def lost(self, job_id: str, deaths: int, pipe: redis.client.Pipeline) -> None:
        """How many times the job's workers died while running it (the reaper counts)."""
        pipe.hset(job_key(job_id), "lost", deaths)

    def _update(self, job_id: str, fields: Fields, **where: Unpack[Where]) -> None:
        pipe, ttl_s = where.get("pipe"), where.get("ttl_s")
        key = job_key(job_id)
        own = pipe is None
        pipe = self.conn.pipeline(transaction=True) if pipe is None else pipe
        pipe.hset(key, mapping=fields)
        pipe.expire(key, ttl_s or self.ttl_s)
        if own:
            pipe.execute()
