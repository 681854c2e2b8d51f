"""The job state machine in a worker: what each Huey event does to a task's jobs.

Huey runs the task loop; we cannot own it, so every hook we add to it lives here, in one
class, registered in this order by `connect` (the hook that marks jobs running comes first:
nothing needs undoing if it refuses). A task answers one job, or several for a group of sync
requests (`wire.members`); every job gets its own record, result and wake-up.

| Huey event                | job record            | lease        | result, wake-up  | metric     |
|---------------------------|-----------------------|--------------|------------------|------------|
| pre-execute               | running (1)           | bound (5)    | -                | running +1 |
| predict answered (2)      | done/failed, each job | -            | each job's       | jobs       |
| post-execute, value       | (the task wrote it)   | may go       | Huey's; woken    | jobs, time |
| post-execute, final error | failed                | may go       | Error, each job  | jobs, time |
| ERROR/TIMEOUT, will retry | queued + reason       | goes (4)     | - (Huey retries) | -          |
| REVOKED / CANCELED        | (the API wrote it)    | may go       | -                | -          |
| EXPIRED                   | expired               | may go       | -                | jobs       |
| INTERRUPTED (SIGTERM) (6) | queued + reason       | put back now | -                | -          |
| lease lapsed (3)          | queued, lost +1       | put back     | -                | -          |
| lapsed, last attempt (3)  | failed `worker_lost`  | dropped      | Error; woken     | jobs       |

(1) atomically with a cancel; a job cancelled or ended already: CancelExecution, not run.
(2) `answered`: records, results and wake-ups of all the task's jobs in one pipeline; a job
    whose own rows failed fails alone.
(3) `reap_lost_tasks`, from any worker's heartbeat; the last attempt is HUEYSERVE_MAX_ATTEMPTS.
(4) once the retry is stored in Huey's queue or schedule; if Redis refuses that write, the
    lease lapses and the reaper queues the task again.
(5) if the records cannot be written (Redis failed), the task is not run and its lease is
    kept, to lapse and be reaped (Huey itself would log the hook's error and run the task).
(6) a task taken while the consumer stops (a thread woken by the doorbell of a task just
    put back) is put back unchanged before it starts, not marked running.

The module is over 300 lines on purpose: every hook the job states depend on, in one class
that the table above describes.

"May go" means the lease is given back when the thread takes its next task, once Huey has
recorded the end (hueyserve.worker.leases); if recording failed, the lease lapses instead
and the reaper queues the task again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from huey import Huey, signals
from huey.api import Task
from huey.exceptions import CancelExecution
from huey.utils import Error

from hueyserve import metrics
from hueyserve.jobs import ENDED, JobKind
from hueyserve.settings import Settings
from hueyserve.wire import Members, job_ids, job_key, message_of, reply_to, result_message
from hueyserve.worker.batching import Answer
from hueyserve.worker.leases import LeasingStorage
from hueyserve.worker.outage import unavailable
from hueyserve.worker.records import JobRecorder

logger = logging.getLogger(__name__)

_TRACKED = {kind.value for kind in JobKind}
_ENDED = {status.value for status in ENDED}


def tracked(task: Task) -> bool:
    """A task with job records (predict, train, reload), not a periodic one."""
    return task.name in _TRACKED


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class JobLifecycle:
    """One per worker process: moves its tasks' jobs through their states."""

    def __init__(self, huey: Huey, records: JobRecorder, settings: Settings) -> None:
        self.huey = huey
        self.records = records
        self.settings = settings  # read at each event, as the rest of the worker does
        self._started: dict[str, float] = {}  # running task id -> perf_counter at its start
        self._abandoned: set[str] = set()  # tasks not started because Redis failed

    @property
    def running(self) -> int:
        """Tasks running now in this process."""
        return len(self._started)

    @property
    def storage(self) -> LeasingStorage:
        storage: LeasingStorage = self.huey.storage  # Huey may replace it (immediate mode)
        return storage

    @property
    def conn(self) -> redis.Redis:
        conn: redis.Redis = self.storage.conn
        return conn

    def connect(self) -> None:
        """Register every hook with Huey, in the order of the table above."""
        self.huey.pre_execute(name="start_jobs")(self.start_jobs)
        self.huey.pre_execute(name="task_started")(self.task_started)
        self.huey.post_execute(name="reply")(self.reply)
        self.huey.post_execute(name="task_ended")(self.task_ended)
        self.huey.signal(signals.SIGNAL_REVOKED, signals.SIGNAL_CANCELED)(self.skipped)
        self.huey.signal(signals.SIGNAL_INTERRUPTED)(self.interrupted)
        self.huey.signal(signals.SIGNAL_EXPIRED)(self.expired)
        self.huey.signal(signals.SIGNAL_ERROR, signals.SIGNAL_TIMEOUT)(self.errored)

    # --- a task starts -----------------------------------------------------------------------

    def start_jobs(self, task: Task) -> None:
        """Mark the task's jobs running, atomically with DELETE /v1/jobs/{id}: a job cancelled
        after Huey's own revoke check is still not run."""
        self.storage.bind(task.id)  # its lease, renewed while it runs
        if self.storage.stopping:  # taken as SIGTERM came: it is for the other consumers
            self._put_back_unrun(task)
            raise CancelExecution(retry=False)
        if not tracked(task):
            return
        try:
            waited = self.records.start(*job_ids(task), ttl_s=self._ttl(task))
        except Exception as exc:  # Huey would log it and run the task anyway: stop it instead
            if unavailable(exc):  # said once per outage; the other threads wait meanwhile
                self.storage.outage.failed(exc, "marking jobs running")
                logger.info("task %s not started: Redis is unavailable", task.id)
            else:
                logger.exception("task %s not started: its jobs cannot be marked running", task.id)
            self._abandoned.add(task.id)  # its lease lapses and a reaper queues it again
            raise CancelExecution(retry=False) from None
        if waited is None:
            logger.info("job %s was cancelled or has ended; not running it", task.id)
            raise CancelExecution()
        for seconds in waited:
            metrics.JOB_QUEUE_SECONDS.labels(task.name).observe(seconds)

    def _put_back_unrun(self, task: Task) -> None:
        """Queue a task this stopping consumer took but will not run, in its old place. If
        Redis fails, its lease (no longer renewed) lapses and a reaper queues it; the error must
        not escape, or Huey would log it and run the task anyway."""
        entry = self.storage.take_back(task.id)
        try:
            if entry is not None:
                self.storage.put_back(entry, task.priority or 0)
        except Exception as exc:
            logger.warning(
                "task %s not put back as its worker stops (%s); its lease lapses",
                task.id,
                reason(exc),
            )

    def task_started(self, task: Task) -> None:
        self._started[task.id] = time.perf_counter()
        metrics.TASKS_RUNNING.labels(task.name).inc()

    # --- a task ends -------------------------------------------------------------------------

    def answered(self, task: Task, members: Members, answers: list[Answer]) -> None:
        """The predict task's end: each job's record (first, so whoever sees the result sees
        finished_at), its result in Huey's own format and key, and the waiter's wake-up, for
        all the jobs in one round trip. A job whose own rows failed fails alone."""
        failed, ttl = 0, self._ttl(task)
        with self.conn.pipeline(transaction=False) as pipe:
            for (job_id, _), answer in zip(members, answers, strict=True):
                if isinstance(answer, Exception):
                    failed += 1
                    self.records.failed(job_id, reason(answer), pipe=pipe, ttl_s=ttl)
                    value: Any = Error(self.huey.build_error_result(task, answer))
                else:
                    self.records.done(job_id, pipe=pipe, ttl_s=ttl)
                    value = answer
                self._store_result(pipe, job_id, value, reply_to(task), ttl)
            try:
                pipe.execute()
            except Exception as exc:  # the task fails and is retried, or its lease lapses
                if unavailable(exc):
                    self.storage.outage.failed(exc, "storing results")  # the others wait
                raise
        metrics.JOBS.labels(task.name, "done").inc(len(members) - failed)
        if failed:
            metrics.JOBS.labels(task.name, "failed").inc(failed)

    def reply(self, task: Task, value: Any, exc: BaseException | None) -> None:
        """Once Huey has stored the final result of a task someone waits for, wake them with
        it (a value, or the Error, stored under every job of a group)."""
        channel = reply_to(task)
        if channel is None or (exc is not None and task.retries):
            return  # nobody waits, or Huey will retry: no final result yet
        if exc is None and value is None:
            return  # the task stored and announced its result itself (predict)
        if exc is None:
            payload = self.huey.serializer.dump_result(task.id, value)
            self.conn.publish(channel, result_message(task.id, payload))
            return
        # Huey stored the Error under the task's id; a group's other jobs need it under theirs.
        error = Error(self.huey.build_error_result(task, exc))
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in job_ids(task):
                self._store_result(pipe, job_id, error, channel, self._ttl(task))
            pipe.execute()

    def task_ended(self, task: Task, value: Any, exc: BaseException | None) -> None:
        if exc is not None and task.retries:
            self.storage.finish_once_requeued()  # Huey queues the retry right after this hook
        else:
            self.storage.finish()  # Huey stored the result or error: the lease may go
        metrics.TASKS_RUNNING.labels(task.name).dec()
        started = self._started.pop(task.id, None)
        if started is not None:
            ran = time.perf_counter() - started
            metrics.TASK_SECONDS.labels(task.name, "ok" if exc is None else "error").observe(ran)
            for _ in job_ids(task) if tracked(task) else ():
                metrics.JOB_RUN_SECONDS.labels(task.name).observe(ran)
        if not tracked(task) or (exc is None and task.name == JobKind.PREDICT.value):
            return  # predict counts its jobs itself (a group's may end differently)
        if exc is None or not task.retries:
            status = "done" if exc is None else "failed"
            metrics.JOBS.labels(task.name, status).inc(len(job_ids(task)))

    # --- a task does not run, or not to its end ----------------------------------------------

    def skipped(self, signal: str, task: Task) -> None:
        if task.id in self._started:
            return  # cancelled from its body: it ran, and `task_ended` decides about the lease
        if task.id in self._abandoned:
            self._abandoned.discard(task.id)  # not started for want of Redis: keep its lease
            return
        self.storage.finish()  # never ran, never will: the lease may go

    def interrupted(self, signal: str, task: Task) -> None:
        """The consumer stopped at once (SIGTERM) while the task ran: queue it again now."""
        entry = self.storage.take_back(task.id)
        if entry is not None:
            self._requeue(task, entry, "its worker stopped while running it; queued again")

    def expired(self, signal: str, task: Task) -> None:
        self.storage.finish()
        if tracked(task):
            for job_id in job_ids(task):
                self.records.expired(job_id, ttl_s=self._ttl(task))
            metrics.JOBS.labels(task.name, "expired").inc(len(job_ids(task)))

    def errored(self, signal: str, task: Task, exc: BaseException | None = None) -> None:
        if not tracked(task):
            return
        why = f"timed out after {task.timeout}s" if exc is None else reason(exc)
        for job_id in job_ids(task):
            if task.retries:  # Huey retries it; the record says why the last attempt failed
                self.records.retrying(job_id, why, ttl_s=self._ttl(task))
            else:
                self.records.failed(job_id, why, ttl_s=self._ttl(task))

    # --- lost workers ------------------------------------------------------------------------

    def reap_lost_tasks(self) -> None:
        """Tasks whose lease expired lost their worker (killed, out of memory): queue them
        again, in their old place, until their workers have died HUEYSERVE_MAX_ATTEMPTS
        times; then their jobs fail with `worker_lost`. Any worker's heartbeat may reap; one
        wins each task."""
        leases = self.storage.leases_key
        for entry in self.storage.expired():
            try:
                task = self.huey.deserialize_task(message_of(entry))
            except Exception:
                logger.exception("dropping a lost task that cannot be read")
                self.conn.zrem(leases, entry)
                continue
            status, lost = self.conn.hmget(job_key(task.id), "status", "lost")
            ended = status is not None and _text(status) in _ENDED
            if not tracked(task) or ended:  # periodic (it runs again next tick), or finished
                self.conn.zrem(leases, entry)
                continue
            deaths = int(lost or 0) + 1
            if deaths < self.settings.max_attempts:
                why = f"worker_lost: its worker died ({deaths}); queued again"
                self._requeue(task, entry, why, deaths)
            elif self.conn.zrem(leases, entry):  # this reaper won the task
                why = f"worker_lost: its worker died in each of {deaths} attempts"
                self._fail_jobs(task, why)
                logger.error("task %s failed: %s", task.id, why)

    def _requeue(self, task: Task, entry: bytes, why: str, deaths: int | None = None) -> None:
        """Say why the task runs again (before: a worker may take it at once), then queue it."""
        with self.conn.pipeline(transaction=True) as pipe:
            for job_id in job_ids(task):
                ttl = self._ttl(task)
                self.records.retrying(job_id, why, requeued=True, pipe=pipe, ttl_s=ttl)
            if deaths is not None:
                self.records.lost(task.id, deaths, pipe=pipe)
            pipe.execute()
        if self.storage.put_back(entry, task.priority or 0):
            logger.warning("task %s: %s", task.id, why)

    def _fail_jobs(self, task: Task, why: str) -> None:
        """Fail every job of a task that will not run again: record, stored Error, wake-up."""
        error = Error({"error": why, "task_id": task.id})
        with self.conn.pipeline(transaction=False) as pipe:
            for job_id in job_ids(task):
                self.records.failed(job_id, why, pipe=pipe, ttl_s=self._ttl(task))
                self._store_result(pipe, job_id, error, reply_to(task), self._ttl(task))
            pipe.execute()
        metrics.JOBS.labels(task.name, "failed").inc(len(job_ids(task)))

    def _ttl(self, task: Task) -> int:
        """How long the task's records and results live: a sync request's caller has its
        answer at once (or reads it soon after a 504), an async job's may come much later."""
        if task.name == JobKind.PREDICT.value and reply_to(task) is not None:
            return self.settings.sync_result_ttl_s
        return self.settings.result_ttl_s

    def _store_result(
        self,
        pipe: redis.client.Pipeline,
        job_id: str,
        value: Any,
        channel: str | None,
        ttl_s: int,
    ) -> None:
        """A job's result (a value or an Error, bound to the job) in Huey's key, and the
        wake-up of the API process waiting for it, which gets the payload itself and so needs
        no read."""
        payload = self.huey.serializer.dump_result(job_id, value)
        pipe.set(self.storage.result_key(job_id), payload, ex=ttl_s)
        if channel is not None:
            pipe.publish(channel, result_message(job_id, payload))
