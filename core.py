"""The Huey instance and every task. Workers run: `huey_consumer core.huey -k thread -w 4`.

Importing this module builds `huey` and empty in-process state; it connects to nothing and
loads no model. The worker's startup hook bootstraps the demo model, promotes the newest
versions and starts the heartbeat.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
from huey import PriorityRedisExpireHuey, crontab, signals
from huey.api import Task
from redis import ConnectionPool

from hueyserve import catalog
from hueyserve.cache import PredictionCache, cache_key
from hueyserve.heartbeat import Heartbeat
from hueyserve.jobs import JobRecorder
from hueyserve.registry import ModelRegistry
from hueyserve.settings import settings
from hueyserve.store import ModelStore
from hueyserve.training import ensure_demo_models
from hueyserve.worker_logging import configure_worker_logging

logger = logging.getLogger(__name__)

huey = PriorityRedisExpireHuey(
    name=settings.queue_name,
    expire_time=settings.result_ttl_s,
    notify_result=True,
    # Sync callers start waiting right after enqueueing, so a wake-up older than the longest
    # sync wait has nobody to wake: let it expire soon (async jobs leave one per job).
    notify_result_ttl=int(settings.predict_timeout_s) + 60,
    # A failed attempt that will be retried must not wake the waiter with an error.
    store_intermediate_errors=False,
    # The consumer blocks on BZPOPMIN for 1 s, so the read timeout must be longer than that.
    connection_pool=ConnectionPool.from_url(
        settings.redis_url,
        socket_connect_timeout=settings.redis_connect_timeout_s,
        socket_timeout=5.0,
        health_check_interval=30,
    ),
)

store = ModelStore(settings.model_dir)
registry = ModelRegistry(store)
worker_cache = PredictionCache(settings.cache_size)
jobs = JobRecorder(huey.storage.conn, ttl_s=settings.result_ttl_s)
heartbeat = Heartbeat(
    huey.storage.conn,
    interval_s=settings.heartbeat_interval_s,
    ttl_s=settings.heartbeat_ttl_s,
    on_beat=lambda: keep_models_published(),
)
_warmed = threading.Event()  # this process has promoted and loaded its models


@huey.task(
    retries=settings.retries,
    retry_delay=settings.retry_delay_s,
    retry_backoff=settings.retry_backoff,
    timeout=settings.predict_timeout_s,
    name="predict",
    context=True,
)
def predict(model: str, version: str, instances: list[list[float]], task: Task) -> list[Any]:
    """Predictions of `model` at `version` for each instance, from the worker's cache if seen."""
    features = np.asarray(instances, dtype=np.float64)
    key = cache_key(model, version, features)
    predictions = worker_cache.get(key)
    if predictions is None:
        predictions = registry.get(model, version).predict(features)
        worker_cache.put(key, predictions)
    # Before Huey stores the result: whoever sees the result also sees finished_at.
    jobs.done(task.id)
    return predictions


@huey.periodic_task(crontab(*settings.refresh_cron.split()), priority=100, name="refresh_models")
def refresh_models() -> dict[str, str]:
    """Promote the newest complete version of every model in the store; returns what changed."""
    ensure_demo_models(store)
    conn = huey.storage.conn
    active = catalog.active_versions(conn)
    promoted: dict[str, str] = {}
    for name in store.names():
        latest = store.latest(name)
        if latest is None or latest == active.get(name):
            continue
        try:
            loaded = registry.get(name, latest)  # refuse a version that does not load
        except Exception:
            logger.exception("model %s version %s does not load; keeping the old one", name, latest)
            continue
        catalog.publish(conn, catalog.ActiveModel(name, latest, loaded.metadata))
        logger.info("model %s: promoted version %s", name, latest)
        promoted[name] = latest
    return promoted


@huey.on_startup()
def start_worker() -> None:
    """Runs in every worker thread; both calls are idempotent. Models are published by the
    heartbeat, so a worker started before Redis still gets ready once Redis answers."""
    configure_worker_logging(settings.log_dir)
    heartbeat.start()


@huey.on_shutdown()
def stop_worker() -> None:
    heartbeat.stop()
    _warmed.clear()


def keep_models_published() -> None:
    """After every heartbeat: until it has once succeeded, promote and load the models (Redis
    may not have been up at start); afterwards, publish them again if Redis lost its data
    rather than waiting for the next scheduled refresh."""
    if not _warmed.is_set():
        refresh_models.call_local()
        active = catalog.active_versions(huey.storage.conn)
        for name in store.names():
            if name in active:
                registry.get(name, active[name])  # the first request should not pay the load
        _warmed.set()
    elif not huey.storage.conn.exists(catalog.MODELS_KEY):
        logger.warning("the active-model index is gone from Redis; republishing")
        refresh_models.call_local()


# --- job records follow the predict task through Huey's signals ---------------------------


def _is_predict(task: Task) -> bool:
    return isinstance(task, predict.task_class)


@huey.signal(signals.SIGNAL_EXECUTING)
def _on_executing(signal: str, task: Task) -> None:
    if _is_predict(task):
        jobs.running(task.id)


@huey.signal(signals.SIGNAL_ERROR, signals.SIGNAL_TIMEOUT)
def _on_error(signal: str, task: Task, exc: BaseException | None = None) -> None:
    if not _is_predict(task):
        return
    reason = f"timed out after {task.timeout}s" if exc is None else f"{type(exc).__name__}: {exc}"
    if task.retries:  # Huey retries it; the record says why the last attempt failed
        jobs.retrying(task.id, reason)
    else:
        jobs.failed(task.id, reason)
