"""One consumer process's state: its model repository, store and registry, cache, batchers, trainer,
job lifecycle and heartbeat, built once by core.py (importing connects to nothing and loads
no model). Huey's startup and shutdown hooks start and stop the background threads."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from huey import Huey

from hueyserve import metrics
from hueyserve.artifacts import ArtifactStore
from hueyserve.cache import PredictionCache
from hueyserve.settings import Settings
from hueyserve.wire import VERSIONS_KEY, eviction_problem, secret_proof
from hueyserve.worker.batching import Batchers, BatchPolicy
from hueyserve.worker.fitting import Trainer
from hueyserve.worker.heartbeat import Heartbeat
from hueyserve.worker.lifecycle import JobLifecycle
from hueyserve.worker.logs import configure_worker_logging
from hueyserve.worker.predicting import Predictor
from hueyserve.worker.publishing import Promoter, entries
from hueyserve.worker.records import JobRecorder
from hueyserve.worker.registry import ModelRegistry
from hueyserve.worker.repository import ModelRepository
from hueyserve.worker.store import ModelStore

logger = logging.getLogger(__name__)


class WorkerProcess:
    """Everything a consumer process holds; `refresh` publishes the models (the periodic
    refresh task, run in this process when the models must be published now)."""

    def __init__(self, huey: Huey, settings: Settings, refresh: Callable[[], object]) -> None:
        self.huey = huey
        self.settings = settings
        self.refresh = refresh
        conn = huey.storage.conn
        self.store = ModelStore(settings.model_dir)
        self.repository = ModelRepository(
            conn,
            self.store,
            ArtifactStore(conn, max_bytes=settings.max_artifact_bytes),
            settings.runtime_options(),
        )
        self.registry = ModelRegistry(self.repository.load)
        self.promoter = Promoter(conn, self.registry, self.repository.locked)
        self.cache = PredictionCache(settings.cache_size, where="worker")
        policy = BatchPolicy(
            max_rows=settings.batch_max_rows,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            adaptive=settings.batch_adaptive,
            target_s=settings.batch_target_ms / 1000,
        )
        self.predictor = Predictor(
            self.cache, Batchers(self.registry.get, policy, observe=metrics.observe_batch)
        )
        self.trainer = Trainer(conn, self.repository, settings)
        self.records = JobRecorder(
            conn, ttl_s=settings.result_ttl_s, events_max_len=settings.events_max_len
        )
        self.lifecycle = JobLifecycle(huey, self.records, settings)
        self.heartbeat = Heartbeat(
            conn,
            interval_s=settings.heartbeat_interval_s,
            ttl_s=settings.heartbeat_ttl_s,
            proof=secret_proof(settings.secret_value()),
            events_max_len=settings.events_max_len,
            status=self.status,
            on_beat=self.after_heartbeat,
            outage=huey.storage.outage,
        )
        self.started_at = time.time()
        self._published = threading.Event()  # this process has bootstrapped and published
        self._running_threads = 0  # the heartbeat outlives every worker thread but the last
        self._lock = threading.Lock()

    def thread_started(self) -> None:
        """Each worker thread, as it starts; the background threads start with the first."""
        configure_worker_logging(self.settings.log_dir, self.settings.task_log_level)
        with self._lock:
            self._running_threads += 1
            self.huey.storage.stopping = False  # a consumer started again in this process
        self.heartbeat.start()
        self.huey.storage.start_renewing(self.settings.heartbeat_interval_s)

    def thread_stopped(self) -> None:
        """Each worker thread, as it stops (gracefully: its last task has ended). The heartbeat,
        which renews the leases of tasks still running, stops with the last thread."""
        self.huey.storage.release()
        with self._lock:
            self._running_threads -= 1
            last = self._running_threads <= 0
        if last:
            self.huey.storage.stop_renewing()
            self.heartbeat.stop()
            self._published.clear()

    def status(self) -> dict[str, Any]:
        """What the dashboard shows of this worker: set with each heartbeat."""
        return {
            "running": self.lifecycle.running,
            "threads": self.settings.workers,
            "models": self.registry.loaded(),
            "started_at": self.started_at,
        }

    def after_heartbeat(self) -> None:
        if not self._published.is_set():  # once per start (and after Redis came back)
            self.check_redis()
        self.lifecycle.reap_lost_tasks()
        self.keep_models_published()

    def check_redis(self) -> None:
        """Say loudly when Redis may drop the tasks and records this worker relies on."""
        try:
            found = self.huey.storage.conn.config_get("maxmemory-policy")
        except redis.ResponseError:  # CONFIG refused (managed services): cannot tell
            return
        problem = eviction_problem(found.get("maxmemory-policy"))
        if problem:
            logger.error("%s", problem)

    def keep_models_published(self) -> None:
        """After every heartbeat: until it has once succeeded, bootstrap and publish the models
        (Redis may not have been up at start); publish them again if Redis lost its data;
        import folders dropped into this host's store; and load every active version, so a
        promotion made elsewhere costs no request a load."""
        conn = self.huey.storage.conn
        published = entries(conn)
        lost = not published and not conn.exists(VERSIONS_KEY)  # not all deleted on purpose
        if not self._published.is_set() or lost:
            if self._published.is_set():
                logger.warning("the model index is gone from Redis; republishing")
            self.refresh()
            published = entries(conn)
            self._published.set()
        else:
            try:  # a folder dropped into this host's store is served within a heartbeat
                if self.repository.sync_local(current=published):
                    published = entries(conn)
            except Exception:  # never the heartbeat's end: the periodic refresh tries again
                logger.exception("importing this host's model folders failed")
        self.registry.keep_active({(e.name, e.active) for e in published.values()})
