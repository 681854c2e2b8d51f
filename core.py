"""The Huey instance and every task. Workers run: `huey_consumer core.huey -k thread -w 8`.

Tasks: `predict` (per request or group of requests), `train` (a new version, low priority),
`reload_model` (make a version active now), `import_model` and `delete_model` (the catalog),
and the periodic `refresh_models` and `retrain_models`. What a worker process holds is
hueyserve.worker.process; what Huey's events do to jobs is hueyserve.worker.lifecycle.

Importing this module builds `huey` and empty in-process state; it connects to nothing and
loads no model. The worker's heartbeat bootstraps the demo models (once per deployment),
imports folders dropped into this host's store and keeps the active versions loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from huey import PriorityRedisExpireHuey, crontab
from huey.api import Task
from huey.exceptions import RetryTask
from redis import ConnectionPool

from hueyserve import wire
from hueyserve.jobs import RELOAD_PRIORITY, JobKind
from hueyserve.models import ModelEntry
from hueyserve.serializer import JsonSerializer
from hueyserve.settings import settings
from hueyserve.training import TrainPlan
from hueyserve.worker.fitting import TrainingLost
from hueyserve.worker.leases import LeasingStorage
from hueyserve.worker.process import WorkerProcess

TRAINING_RETRY_S = 5  # a training job that finds another running looks again this much later


class Huey(PriorityRedisExpireHuey):  # type: ignore[misc]
    """Huey's priority queue with expiring results, each stored bound to its task's id, and
    periodic tasks enqueued once per tick across all consumers."""

    def put_result(self, key: str, data: Any) -> Any:
        return self.storage.put_data(key, self.serializer.dump_result(key, data), is_result=True)

    def notify_interrupted_tasks(self) -> None:
        """The consumer stops: first its threads take no more tasks (with SIGTERM they may
        still run for a moment, and took back a task just put back), then each task still
        running goes back to the queue (hueyserve.worker.lifecycle.interrupted)."""
        self.storage.stopping = True
        super().notify_interrupted_tasks()

    def read_periodic(self, timestamp: Any) -> list[Any]:
        """The periodic tasks due now that this consumer's scheduler claimed: one per minute
        however many consumers run (hueyserve.worker.leases.LeasingStorage.claim_tick)."""
        due = super().read_periodic(timestamp)
        moment = timestamp or self._get_timestamp()
        minute = moment.strftime("%Y%m%d%H%M")
        return [task for task in due if self.storage.claim_tick(task.name, minute)]


huey = Huey(
    name=settings.queue_name,
    # Every task a worker takes is leased until it is done: at least once (worker/leases.py).
    storage_class=LeasingStorage,
    lease_s=settings.lease_s,
    expire_time=settings.result_ttl_s,
    # Waiters are woken by one pub/sub channel per API process (hueyserve.api.waiting), not
    # by Huey's per-task notification lists.
    notify_result=False,
    # A failed attempt that will be retried must not wake the waiter with an error.
    store_intermediate_errors=False,
    # JSON, never pickle: what is read from Redis is data, not code. With a secret, every
    # message and result is signed; a forged or tampered message fails to deserialize and the
    # consumer logs and drops it ("Error reading from queue"), never running it.
    serializer=JsonSerializer(settings.secret_value()),
    # The consumer blocks on the doorbell for 1 s, so the read timeout must be longer.
    connection_pool=ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=5.0,
        health_check_interval=30,
    ),
)
# What a consumer process holds. The API imports this module for the tasks and builds it too,
# but only a consumer's hooks start it.
worker = WorkerProcess(huey, settings, refresh=lambda: refresh_models.call_local())  # type: ignore[has-type]
worker.lifecycle.connect()
huey.on_startup(name="thread_started")(worker.thread_started)
huey.on_shutdown(name="thread_stopped")(worker.thread_stopped)


@huey.task(
    retries=settings.retries,
    retry_delay=settings.retry_delay_s,
    retry_backoff=settings.retry_backoff,
    timeout=settings.predict_timeout_s,
    name=JobKind.PREDICT.value,
    context=True,
)
def predict(
    model: str,
    version: str,
    features: np.ndarray,
    reply_to: str | None = None,
    members: wire.Members | None = None,
    *,
    task: Task,
) -> None:
    """Outputs of `model` at `version` for each job's rows (`wire.predict_options`: a group
    names its jobs; by default the task is one job). `reply_to` names the API process
    waiting for them."""
    jobs = wire.members(task, len(features))
    ends = np.cumsum([rows for _, rows in jobs])
    answers = worker.predictor.answers(model, version, np.split(features, ends[:-1]))
    errors = [answer for answer in answers if isinstance(answer, Exception)]
    if len(errors) == len(answers):
        raise errors[0]  # Huey retries the task, or fails every job (worker.lifecycle)
    worker.lifecycle.answered(task, jobs, answers)
    return None  # stored already; Huey stores no None (store_none is off)


@huey.task(name=JobKind.TRAIN.value, context=True)
def train(name: str, plan: TrainPlan, task: Task) -> dict[str, Any]:
    """Train a new version of `name` as planned, save it and make it active (unless an
    operator pinned another). One training runs at a time: the others wait in the queue
    rather than hold worker threads."""
    with worker.trainer.slot(wait_s=None) as owner:
        if owner is None:
            worker.records.retrying(task.id, "waiting for the training that is running to finish")
            raise RetryTask(delay=TRAINING_RETRY_S)
        try:
            version = worker.trainer.train(name, plan, owner, job_id=task.id)
        except TrainingLost as lost:  # presumed dead meanwhile: run the job again, not fail it
            worker.records.retrying(task.id, str(lost))
            raise RetryTask(delay=TRAINING_RETRY_S) from lost
    entry = worker.promoter.entry(name)
    worker.records.done(task.id, version=version)
    model = entry.get(version)
    return {
        "model_name": model.name,
        "model_version": model.version,
        "active_version": entry.active,
        "pinned": entry.pinned,
        "metrics": model.metadata.get("metrics", {}),
    }


@huey.task(priority=RELOAD_PRIORITY, name=JobKind.RELOAD.value, context=True)
def reload_model(
    name: str, version: str | None, reply_to: str | None = None, *, task: Task
) -> dict[str, Any]:
    """Make `version` active (pinned), or the newest (unpinned) when None."""
    if version is None:  # "the newest": a folder just dropped into this host's store too
        worker.repository.sync_local(settle_s=0, wait=True)
    previous, entry = worker.promoter.promote(name, version)
    worker.records.done(task.id)
    return {
        "model_name": entry.name,
        "active_version": entry.active,
        "previous_version": previous.active if previous else None,
        "pinned": entry.pinned,
    }


@huey.task(priority=RELOAD_PRIORITY, name=JobKind.IMPORT.value, context=True)
def import_model(
    name: str,
    metadata: dict[str, Any],
    activate: bool = True,
    reply_to: str | None = None,
    *,
    task: Task,
) -> dict[str, Any]:
    """A version imported through the API: its files fetched (Redis or its URI) and checked
    against their SHA-256, loaded, its signature checked and its example answered; only then
    is it given the next number and (with `activate`, unless pinned) made active."""
    entry, model = worker.repository.import_version(name, metadata, activate=activate)
    worker.records.done(task.id, version=model.version)
    return version_summary(entry, model.version)


@huey.task(priority=RELOAD_PRIORITY, name=JobKind.DELETE.value, context=True)
def delete_model(
    name: str, version: str | None, reply_to: str | None = None, *, task: Task
) -> dict[str, Any]:
    """Delete a version (not the active one) or, with None, the whole model; frees the
    artifacts no other version uses."""
    entry = worker.repository.delete(name, version)
    worker.registry.forget(name, version)
    worker.records.done(task.id)
    return {
        "model_name": name,
        "deleted_version": version,
        "versions": entry.version_list() if entry else [],
        "active_version": entry.active if entry else None,
    }


def version_summary(entry: ModelEntry, version: str) -> dict[str, Any]:
    metadata = entry.versions[version]
    return {
        "model_name": entry.name,
        "model_version": version,
        "active_version": entry.active,
        "pinned": entry.pinned,
        "runtime": metadata.get("runtime"),
        "inputs": metadata.get("inputs"),
        "outputs": metadata.get("outputs"),
        "files": metadata.get("files"),
    }


@huey.periodic_task(crontab(*settings.refresh_cron.split()), priority=100, name="refresh_models")
def refresh_models() -> dict[str, str]:
    """Import the versions found in this host's model folder that the deployment never had,
    and create the demo models once per deployment; returns {name: version} imported."""
    imported = worker.repository.sync_local(wait=True)  # whole, before any demo is trained
    worker.repository.ensure_demos(settings.dataset_dir)
    return imported


def _retrain_due(moment: Any) -> bool:
    return bool(settings.retrain_cron) and crontab(*settings.retrain_cron.split())(moment)


@huey.periodic_task(_retrain_due, priority=settings.train_priority, name="retrain_models")
def retrain_models() -> dict[str, Any]:
    """HUEYSERVE_RETRAIN_CRON: train each model again on its data source when the data changed
    since its newest version, then refresh (a pinned model keeps its version)."""
    return worker.trainer.retrain(set(settings.retrain_models.split(",")) - {""})
