"""The Huey instance and every task. Workers run: `huey_consumer core.huey -k thread -w 8`.

Tasks: `predict` (per request), `train` (a new version, low priority), `reload_model` (make a
version active now), and the periodic `refresh_models` and `retrain_models`.

Importing this module builds `huey` and empty in-process state; it connects to nothing and
loads no model. The worker's heartbeat bootstraps the demo models, publishes them and keeps
the active versions loaded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import redis
from huey import PriorityRedisExpireHuey, crontab, signals
from huey.api import Task
from huey.exceptions import CancelExecution, RetryTask
from huey.serializer import SignedSerializer
from huey.utils import Error
from redis import ConnectionPool
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from hueyserve import catalog, datasets, metrics, results, training
from hueyserve.batching import Batchers, BatchPolicy, split_rows
from hueyserve.cache import PredictionCache, cache_key
from hueyserve.heartbeat import Heartbeat
from hueyserve.jobs import ENDED, JobKind, JobRecorder, job_key
from hueyserve.leases import PREFIX_BYTES, LeasingStorage
from hueyserve.promotion import Promoter
from hueyserve.registry import ModelRegistry, Outputs
from hueyserve.settings import settings
from hueyserve.store import ModelStore
from hueyserve.worker_logging import configure_worker_logging

logger = logging.getLogger(__name__)

LeasingStorage.lease_s = settings.lease_s
huey = PriorityRedisExpireHuey(
    name=settings.queue_name,
    # Every task a worker takes is leased until it is done: at least once (hueyserve.leases).
    storage_class=LeasingStorage,
    expire_time=settings.result_ttl_s,
    # Waiters are woken by hueyserve.results (one pub/sub channel per API process), not by
    # Huey's per-task notification lists.
    notify_result=False,
    # A failed attempt that will be retried must not wake the waiter with an error.
    store_intermediate_errors=False,
    # With a secret, every message is signed; a forged or tampered one fails to deserialize
    # and the consumer logs and drops it ("Error reading from queue"), never running it.
    serializer=SignedSerializer(settings.secret.get_secret_value()) if settings.secret else None,
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
promoter = Promoter(huey.storage.conn, store, registry)
worker_cache = PredictionCache(settings.cache_size, where="worker")
batchers = Batchers(
    registry.get,
    BatchPolicy(
        max_rows=settings.batch_max_rows,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        adaptive=settings.batch_adaptive,
        target_s=settings.batch_target_ms / 1000,
    ),
    observe=metrics.observe_batch,
)
stopwatch = metrics.Stopwatch()
jobs = JobRecorder(huey.storage.conn, ttl_s=settings.result_ttl_s)
heartbeat = Heartbeat(
    huey.storage.conn,
    interval_s=settings.heartbeat_interval_s,
    ttl_s=settings.heartbeat_ttl_s,
    on_beat=lambda: after_heartbeat(),
)
_warmed = threading.Event()  # this process has bootstrapped and published its models
_threads = [0]  # worker threads running in this process (the heartbeat outlives all but one)
_threads_lock = threading.Lock()
TRAINING_LOCK = "hueyserve:training"
TRAINING_RETRY_S = 5  # a training job that finds another running looks again this much later


@huey.task(
    retries=settings.retries,
    retry_delay=settings.retry_delay_s,
    retry_backoff=settings.retry_backoff,
    timeout=settings.predict_timeout_s,
    name="predict",
    context=True,
)
def predict(
    model: str,
    version: str,
    features: np.ndarray,
    reply_to: str | None = None,
    members: list[tuple[str, int]] | None = None,
    *,
    task: Task,
) -> None:
    """Outputs of `model` at `version` for each row, from the worker's cache if seen.
    `members` splits the rows among the jobs of a group of sync requests (job id, rows); by
    default the task is one job. `reply_to` names the API process waiting for them."""
    parts = members or [(task.id, len(features))]
    ends = np.cumsum([rows for _, rows in parts])
    answers = _answers(model, version, np.split(features, ends[:-1]))
    errors = [answer for answer in answers if isinstance(answer, Exception)]
    if len(errors) == len(answers):
        raise errors[0]  # Huey retries the task, or fails every job (_reply, _on_error)
    # One round trip for all the jobs: each job's record (first, so whoever sees the result
    # sees finished_at), its result in Huey's own format and key, and the waiter's wake-up.
    with huey.storage.conn.pipeline(transaction=False) as pipe:
        for (job_id, _), answer in zip(parts, answers, strict=True):
            if isinstance(answer, Exception):  # this job's own rows failed, the others' did not
                jobs.failed(job_id, _reason(answer), pipe=pipe)
                payload = huey.serializer.serialize(Error(huey.build_error_result(task, answer)))
            else:
                jobs.done(job_id, pipe=pipe)
                payload = huey.serializer.serialize(answer)
            _store_result(pipe, job_id, payload, reply_to)
        pipe.execute()
    metrics.JOBS.labels(task.name, "done").inc(len(parts) - len(errors))
    if errors:
        metrics.JOBS.labels(task.name, "failed").inc(len(errors))
    return None  # stored already; Huey stores no None (store_none is off)


def _store_result(
    pipe: redis.client.Pipeline, job_id: str, payload: bytes, channel: str | None
) -> None:
    """A job's result (a value or an Error) in Huey's format and key, and the wake-up of the
    API process waiting for it, which gets the payload itself and so needs no read."""
    pipe.set(huey.storage.result_key(job_id), payload, ex=settings.result_ttl_s)
    if channel is not None:
        results.publish_result(pipe, channel, job_id, payload)


def _answers(model: str, version: str, inputs: list[np.ndarray]) -> list[Outputs | Exception]:
    """Each input's outputs (or the error of its own rows), from the worker's cache if seen."""
    keys = [cache_key(model, version, rows) for rows in inputs]
    answers: list[Outputs | Exception | None] = [worker_cache.get(key) for key in keys]
    missing = [i for i, answer in enumerate(answers) if answer is None]
    computed = _predict_each(model, version, [inputs[i] for i in missing])
    for i, answer in zip(missing, computed, strict=True):
        answers[i] = answer
        if not isinstance(answer, Exception):
            worker_cache.put(keys[i], answer)
    return cast(list[Outputs | Exception], answers)


def _predict_each(model: str, version: str, inputs: list[np.ndarray]) -> list[Outputs | Exception]:
    """One batched call (with concurrent tasks) for all the inputs. If it fails, each half
    again, so one bad input fails only its own job, in a few calls even in a large group."""
    if not inputs:
        return []  # all answered from the cache
    try:
        if len(inputs) == 1:
            return [batchers.predict(model, version, inputs[0])]
        outputs = batchers.predict(model, version, np.concatenate(inputs))
        return list(split_rows(outputs, [len(rows) for rows in inputs]))
    except Exception as exc:
        if len(inputs) == 1:
            return [exc]
        half = len(inputs) // 2
        return [
            *_predict_each(model, version, inputs[:half]),
            *_predict_each(model, version, inputs[half:]),
        ]


@huey.task(name="train", context=True)
def train(name: str, plan: training.TrainPlan, task: Task) -> dict[str, Any]:
    """Train a new version of `name` as planned, save it and make it active (unless an
    operator pinned another). One training runs at a time: the others wait in the queue
    rather than hold worker threads."""
    with _training_slot(wait_s=None) as mine:
        if not mine:
            jobs.retrying(task.id, "waiting for the training that is running to finish")
            raise RetryTask(delay=TRAINING_RETRY_S)
        version = _train(name, plan)
    entry = promoter.publish_new(name)  # loads it here first: no request waits for the load
    jobs.done(task.id, version=version)
    return _trained(entry.get(version), entry)


@huey.task(priority=100, name="reload_model", context=True)
def reload_model(
    name: str, version: str | None, reply_to: str | None = None, *, task: Task
) -> dict[str, Any]:
    """Make `version` active (pinned), or the newest (unpinned) when None."""
    previous, entry = promoter.promote(name, version)
    jobs.done(task.id)
    return {
        "model_name": name,
        "active_version": entry.active,
        "previous_version": previous.active if previous else None,
        "pinned": entry.pinned,
    }


@huey.periodic_task(crontab(*settings.refresh_cron.split()), priority=100, name="refresh_models")
def refresh_models() -> dict[str, str]:
    """Publish every model in the store with its newest version active (unless pinned);
    returns the models whose active version changed."""
    training.ensure_demo_models(store, settings.dataset_dir)
    return promoter.refresh()


def _retrain_due(moment: Any) -> bool:
    return bool(settings.retrain_cron) and crontab(*settings.retrain_cron.split())(moment)


@huey.periodic_task(_retrain_due, priority=settings.train_priority, name="retrain_models")
def retrain_models() -> dict[str, Any]:
    """HUEYSERVE_RETRAIN_CRON: train each model again on its data source when the data changed
    since its newest version, then refresh (a pinned model keeps its version)."""
    wanted = set(settings.retrain_models.split(",")) - {""}
    retrained: dict[str, Any] = {}
    for name in store.names():
        if wanted and name not in wanted:
            continue
        newest = store.metadata(name, store.versions(name)[-1])
        plan = training.TrainPlan.from_metadata(newest)
        if plan is None:
            continue  # not trained by hueyserve: no data source to go back to
        try:
            fingerprint = datasets.fingerprint(plan.dataset, settings.dataset_dir)
            if fingerprint == newest["training"]["fingerprint"]:
                logger.info("retrain %s: data unchanged since version %s", name, newest["version"])
                continue
            with _training_slot(wait_s=settings.train_timeout_s) as mine:
                if not mine:
                    raise TimeoutError("another training held the lock for too long")
                retrained[name] = _train(name, plan)
        except Exception:  # one bad data source must not stop the others
            logger.exception("retrain %s failed", name)
    promoter.refresh(list(retrained))
    return retrained


@contextlib.contextmanager
def _training_slot(wait_s: float | None) -> Iterator[bool]:
    """One training at a time across every worker: yields whether this one may train (after
    waiting up to `wait_s`; None: not at all). The lock lives HUEYSERVE_LEASE_S and is
    renewed while the training runs, so a worker that dies while training frees it soon."""
    lock: Lock = huey.storage.conn.lock(
        TRAINING_LOCK, timeout=settings.lease_s, blocking_timeout=wait_s
    )
    if not lock.acquire(blocking=wait_s is not None):
        yield False
        return
    done = threading.Event()

    def renew() -> None:
        while not done.wait(settings.lease_s / 3):
            try:
                lock.extend(settings.lease_s, replace_ttl=True)
            except (LockError, RedisError) as exc:
                logger.warning("could not renew the training lock: %s", exc)

    threading.Thread(target=renew, name="training-lock", daemon=True).start()
    try:
        yield True
    finally:
        done.set()
        with contextlib.suppress(LockError, RedisError):  # lost: expired meanwhile
            lock.release()


def _train(name: str, plan: training.TrainPlan) -> str:
    return training.train_in_child(
        store,
        name,
        plan,
        settings.dataset_dir,
        niceness=settings.train_niceness,
        timeout_s=settings.train_timeout_s,
    )


def _trained(model: catalog.ModelVersion, entry: catalog.ModelEntry) -> dict[str, Any]:
    return {
        "model_name": model.name,
        "model_version": model.version,
        "active_version": entry.active,
        "pinned": entry.pinned,
        "metrics": model.metadata.get("metrics", {}),
    }


@huey.on_startup()
def start_worker() -> None:
    """Runs in every worker thread; both calls are idempotent. Models are published by the
    heartbeat, so a worker started before Redis still gets ready once Redis answers."""
    configure_worker_logging(settings.log_dir)
    with _threads_lock:
        _threads[0] += 1
    heartbeat.start()
    huey.storage.start_renewing(settings.heartbeat_interval_s)


@huey.on_shutdown()
def stop_worker() -> None:
    """Runs in every worker thread as it stops (gracefully: its last task has ended). The
    heartbeat, which renews the leases of tasks still running, stops with the last thread."""
    huey.storage.release()
    with _threads_lock:
        _threads[0] -= 1
        last = _threads[0] <= 0
    if last:
        huey.storage.stop_renewing()
        heartbeat.stop()
        _warmed.clear()


def after_heartbeat() -> None:
    reap_lost_tasks()
    keep_models_published()


def reap_lost_tasks() -> None:
    """Tasks whose lease expired lost their worker (killed, out of memory): queue them again,
    in their old place, until their workers have died HUEYSERVE_MAX_ATTEMPTS times; then
    their jobs fail with `worker_lost`. Any worker's heartbeat may reap; one wins each task."""
    conn = huey.storage.conn
    for entry in huey.storage.expired():
        try:
            task = huey.deserialize_task(entry[PREFIX_BYTES:])
        except Exception:
            logger.exception("dropping a lost task that cannot be read")
            conn.zrem(huey.storage.leases_key, entry)
            continue
        status, lost = conn.hmget(job_key(task.id), "status", "lost")
        ended = status is not None and status.decode() in {s.value for s in ENDED}
        if not _tracked(task) or ended:  # periodic (it runs again next tick), or finished
            conn.zrem(huey.storage.leases_key, entry)
            continue
        deaths = int(lost or 0) + 1
        if deaths >= settings.max_attempts:
            if conn.zrem(huey.storage.leases_key, entry):  # this reaper won the task
                reason = f"worker_lost: its worker died in each of {deaths} attempts"
                _fail_jobs(task, reason, (task.kwargs or {}).get("reply_to"))
                logger.error("task %s failed: %s", task.id, reason)
            continue
        _requeue(task, entry, f"worker_lost: its worker died ({deaths}); queued again", deaths)


def _requeue(task: Task, entry: bytes, reason: str, deaths: int | None = None) -> None:
    """Say why the task runs again (before: a worker may take it at once), then queue it."""
    with huey.storage.conn.pipeline(transaction=True) as pipe:
        for job_id in _job_ids(task):
            jobs.retrying(job_id, reason, pipe=pipe)
        if deaths is not None:
            pipe.hset(job_key(task.id), "lost", deaths)
        pipe.execute()
    if huey.storage.put_back(entry, task.priority or 0):
        logger.warning("task %s: %s", task.id, reason)


def _fail_jobs(task: Task, reason: str, channel: str | None) -> None:
    """Fail every job of a task that will not run again: record, stored Error, wake-up."""
    error = huey.serializer.serialize(Error({"error": reason, "task_id": task.id}))
    with huey.storage.conn.pipeline(transaction=False) as pipe:
        for job_id in _job_ids(task):
            jobs.failed(job_id, reason, pipe=pipe)
            _store_result(pipe, job_id, error, channel)
        pipe.execute()
    metrics.JOBS.labels(task.name, "failed").inc(len(_job_ids(task)))


def keep_models_published() -> None:
    """After every heartbeat: until it has once succeeded, bootstrap and publish the models
    (Redis may not have been up at start); publish them again if Redis lost its data; and
    load every active version, so a promotion made elsewhere costs no request a load."""
    published = catalog.entries(huey.storage.conn)
    if not _warmed.is_set() or not published:
        if _warmed.is_set():
            logger.warning("the model index is gone from Redis; republishing")
        refresh_models.call_local()
        published = catalog.entries(huey.storage.conn)
        _warmed.set()
    on_disk = store.names()
    registry.keep_active({(e.name, e.active) for e in published.values() if e.name in on_disk})


@huey.post_execute()
def _reply(task: Task, value: Any, exc: BaseException | None) -> None:
    """Once Huey has stored the final result of a task someone waits for, wake them with it
    (a value, or the Error, stored under every job of a group)."""
    channel = (task.kwargs or {}).get("reply_to")
    if channel is None or (exc is not None and task.retries):
        return  # nobody waits, or Huey will retry: no final result yet
    if exc is None and value is None:
        return  # the task stored and announced its result itself (predict)
    if exc is None:
        results.publish_result(
            huey.storage.conn, channel, task.id, huey.serializer.serialize(value)
        )
        return
    # Huey stored the Error under the task's id; a group's other jobs need it under theirs.
    error = huey.serializer.serialize(Error(huey.build_error_result(task, exc)))
    with huey.storage.conn.pipeline(transaction=False) as pipe:
        for job_id in _job_ids(task):
            _store_result(pipe, job_id, error, channel)
        pipe.execute()


@huey.pre_execute()
def _start_jobs(task: Task) -> None:
    """Mark the task's jobs running, atomically with DELETE /v1/jobs/{id}: a job cancelled
    after Huey's own revoke check is still not run. (First hook: nothing to undo.)"""
    huey.storage.bind(task.id)  # its lease, renewed while it runs
    if _tracked(task) and not jobs.start(*_job_ids(task)):
        logger.info("job %s was cancelled or has ended; not running it", task.id)
        raise CancelExecution()


@huey.pre_execute()
def _task_started(task: Task) -> None:
    stopwatch.start(task.id)
    metrics.TASKS_RUNNING.labels(task.name).inc()


@huey.post_execute()
def _task_ended(task: Task, value: Any, exc: BaseException | None) -> None:
    huey.storage.finish()  # Huey stored the result or error: the lease may go
    metrics.TASKS_RUNNING.labels(task.name).dec()
    seconds = stopwatch.stop(task.id)
    if seconds is not None:
        metrics.TASK_SECONDS.labels(task.name, "ok" if exc is None else "error").observe(seconds)
    if not _tracked(task) or (exc is None and task.name == predict.name):
        return  # predict counts its jobs itself (a group's may end differently)
    if exc is None or not task.retries:
        metrics.JOBS.labels(task.name, "done" if exc is None else "failed").inc(len(_job_ids(task)))


# --- job records follow the tasks through Huey's signals ---------------------------------


_TRACKED = {kind.value for kind in JobKind}


def _tracked(task: Task) -> bool:
    return task.name in _TRACKED


def _job_ids(task: Task) -> list[str]:
    """The jobs a task answers: a group of sync requests names them; otherwise its own id."""
    members = (task.kwargs or {}).get("members")
    return [job_id for job_id, _ in members] if members else [task.id]


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@huey.signal(signals.SIGNAL_REVOKED, signals.SIGNAL_CANCELED)
def _on_skipped(signal: str, task: Task) -> None:
    huey.storage.finish()  # never ran, never will: the lease may go


@huey.signal(signals.SIGNAL_INTERRUPTED)
def _on_interrupted(signal: str, task: Task) -> None:
    """The consumer stopped at once (SIGTERM) while the task ran: queue it again now."""
    entry = huey.storage.take_back(task.id)
    if entry is not None:
        _requeue(task, entry, "its worker stopped while running it; queued again")


@huey.signal(signals.SIGNAL_EXPIRED)
def _on_expired(signal: str, task: Task) -> None:
    huey.storage.finish()
    if _tracked(task):
        for job_id in _job_ids(task):
            jobs.expired(job_id)
        metrics.JOBS.labels(task.name, "expired").inc(len(_job_ids(task)))


@huey.signal(signals.SIGNAL_ERROR, signals.SIGNAL_TIMEOUT)
def _on_error(signal: str, task: Task, exc: BaseException | None = None) -> None:
    if not _tracked(task):
        return
    reason = f"timed out after {task.timeout}s" if exc is None else _reason(exc)
    for job_id in _job_ids(task):
        if task.retries:  # Huey retries it; the record says why the last attempt failed
            jobs.retrying(job_id, reason)
        else:
            jobs.failed(job_id, reason)
