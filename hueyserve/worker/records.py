"""Worker-side updates of job records (synchronous Redis), as hueyserve.worker.lifecycle
decides them: running, done, failed, retrying, expired, progress. Each update adds its event
to the event stream in the same script (wire.JOB_EVENT_LUA), so a reader of the stream never
misses a change the record shows."""

from __future__ import annotations

import time
from typing import TypedDict, Unpack

import redis

from hueyserve.jobs import Fields, JobStatus
from hueyserve.wire import EVENTS_KEY, RECORD_SCRIPT, START_SCRIPT, job_key
from hueyserve.worker.heartbeat import worker_id


class Where(TypedDict, total=False):
    """Where an update goes: into `pipe` (the caller executes it; else at once), and the
    record's TTL from now (`ttl_s`; else the recorder's)."""

    pipe: redis.client.Pipeline
    ttl_s: int


class JobRecorder:
    """Writes the records of one worker process's jobs; each write renews the record's TTL
    (`ttl_s`, or the shorter one a sync request's job gets)."""

    def __init__(self, conn: redis.Redis, *, ttl_s: int, events_max_len: int) -> None:
        self.conn = conn
        self.ttl_s = ttl_s
        self.events_max_len = events_max_len
        self._start = conn.register_script(START_SCRIPT)
        self._record = conn.register_script(RECORD_SCRIPT)

    def start(self, *job_ids: str, ttl_s: int | None = None) -> list[float] | None:
        """Mark the jobs running (a group's all at once), unless one was cancelled or has
        ended: then nothing changes and the answer is None. Atomic against `cancel`. Answers
        how long each job waited since it was queued."""
        keys = [EVENTS_KEY, *(job_key(job_id) for job_id in job_ids)]
        ttl, now = ttl_s or self.ttl_s, time.time()
        created = self._start(keys=keys, args=[now, ttl, worker_id(), self.events_max_len])
        if not created:
            return None
        return [max(0.0, now - float(raw)) if raw else 0.0 for raw in created]

    def expired(self, job_id: str, **where: Unpack[Where]) -> None:
        reason = "not run: its deadline passed while it was queued"
        expired: Fields = {"status": JobStatus.EXPIRED.value, "error": reason}
        self._update(job_id, {**expired, "finished_at": time.time()}, "expired", **where)

    def done(self, job_id: str, *, version: str | None = None, **where: Unpack[Where]) -> None:
        """Finished; `version` is what only the end tells (the version a training made)."""
        done: Fields = {"status": JobStatus.DONE.value, "finished_at": time.time()}
        if version is not None:
            done["version"] = version
        self._update(job_id, done, "done", **where)

    def failed(self, job_id: str, error: str, **where: Unpack[Where]) -> None:
        now = time.time()
        failed: Fields = {"status": JobStatus.FAILED.value, "error": error, "finished_at": now}
        self._update(job_id, failed, "failed", extra={"error": error}, **where)

    def retrying(
        self, job_id: str, error: str, *, requeued: bool = False, **where: Unpack[Where]
    ) -> None:
        """Queued again: Huey retries it after an error (`retrying`), or its worker was lost
        or stopped (`requeued`)."""
        queued: Fields = {"status": JobStatus.QUEUED.value, "error": error}
        event = "requeued" if requeued else "retrying"
        self._update(job_id, queued, event, extra={"error": error}, **where)

    def progress(self, job_id: str, stage: str, fraction: float | None = None) -> None:
        """A long job's stage, and how far along it is (0 to 1) where that is known."""
        fields: Fields = {"stage": stage}
        if fraction is not None:
            fields["progress"] = round(min(max(fraction, 0.0), 1.0), 4)
        self._update(job_id, fields, "progress", extra=fields)

    def lost(self, job_id: str, deaths: int, pipe: redis.client.Pipeline) -> None:
        """How many times the job's workers died while running it (the reaper counts)."""
        pipe.hset(job_key(job_id), "lost", deaths)

    def _update(
        self,
        job_id: str,
        fields: Fields,
        event: str,
        pipe: redis.client.Pipeline | None = None,
        ttl_s: int | None = None,
        extra: Fields | None = None,
    ) -> None:
        """Change the record and add `event` (with the `extra` fields) to the stream."""
        args: list[str | int | float] = [ttl_s or self.ttl_s, self.events_max_len, event]
        args += [time.time(), len(fields)]
        for field, value in fields.items():
            args += [field, value]
        for field, value in (extra or {}).items():
            args += [field, value]
        self._record(keys=[job_key(job_id), EVENTS_KEY], args=args, client=pipe)
