"""The shared nouns of jobs: their kinds, their statuses and a new job's record.

Huey keeps only a task's result; a job record (a Redis hash under `wire.job_key`) adds
status, timestamps, attempts and the last error, so `GET /v1/jobs/{id}` can say `queued` or
`running` before there is a result. The API writes the record in the same script that
enqueues the task (hueyserve.api.queue); workers update it as the task goes
(hueyserve.worker.records, driven by hueyserve.worker.lifecycle).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

RELOAD_PRIORITY = 100  #: a reload is quick and someone waits for it


class JobKind(StrEnum):
    """What a job does; the values are the names of the Huey tasks in core.py."""

    PREDICT = "predict"
    TRAIN = "train"
    RELOAD = "reload_model"
    IMPORT = "import_model"
    DELETE = "delete_model"


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
