"""Health in the API process: readiness, the details of GET /health, the queue-depth gauge."""

from __future__ import annotations

import time
from typing import Any

from hueyserve import metrics
from hueyserve.api.catalog import ModelCatalog
from hueyserve.api.probes import RedisProbe
from hueyserve.api.queue import TaskQueue
from hueyserve.cache import PredictionCache
from hueyserve.errors import ServiceError
from hueyserve.settings import Settings
from hueyserve.wire import eviction_problem, secret_proof

PRIORITY_LEVELS = range(101)  #: every priority a request, job or periodic task can have


class HealthService:
    """One per API process: what probes, scrapers and operators read."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: TaskQueue,
        catalog: ModelCatalog,
        cache: PredictionCache,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.cache = cache
        self.proof = secret_proof(settings.secret_value())  #: what workers sharing it show
        self.redis = RedisProbe(queue.client, queue.storage.queue_key)
        self._priorities_seen: set[int] = set()

    async def readiness(self) -> list[str]:
        """Why this server is not ready; an empty list means ready."""
        reasons = []
        try:
            await self.redis.ping_ms()
            if not self.queue.results.connected.is_set():  # sync calls would get 503s
                reasons.append(
                    "not subscribed to result notifications yet (Redis was just unreachable)"
                )
            alive, sharing = await self._workers()
            if not alive:
                reasons.append("no worker has reported in: start `huey_consumer core.huey`")
            elif not sharing:
                reasons.append(
                    f"{len(alive)} worker(s) report in, but none shares this API's "
                    "HUEYSERVE_SECRET, so none can read its tasks: set the same secret (or "
                    "none) on the API and every worker"
                )
            eviction = eviction_problem(await self.redis.eviction_policy())
            if eviction:
                reasons.append(eviction)
        except ServiceError as exc:
            reasons.append(exc.message)
        if not self.catalog.models:
            reasons.append("no model is loaded yet")
        return reasons

    async def model_ready(self) -> bool:
        """A published model is ready when some worker is alive to serve it."""
        try:
            return bool(await self.workers())
        except ServiceError:
            return False

    async def workers(self, *, all_secrets: bool = False) -> dict[str, float]:
        """Workers seen within the heartbeat TTL that share this API's secret (or all, with
        `all_secrets`), with the age of their last beat in seconds."""
        alive, sharing = await self._workers()
        return alive if all_secrets else sharing

    async def _workers(self) -> tuple[dict[str, float], dict[str, float]]:
        """Every live worker, and those sharing this API's secret, from one read."""
        now = time.time()
        beats = await self.redis.heartbeats(since=now - self.settings.heartbeat_ttl_s)
        alive = {worker: round(now - beat, 3) for worker, _, beat in beats}
        # "": a worker of an older release, which shows no proof: cannot tell, so trust it
        sharing = {w: alive[w] for w, proof, _ in beats if proof in (self.proof, "")}
        return alive, sharing

    async def worker_details(self) -> list[dict[str, Any]]:
        """Every live worker: host, pid, age of its last beat, what it runs and holds."""
        alive, sharing = await self._workers()
        statuses = await self.redis.worker_statuses(sorted(alive))
        details = []
        for worker, status in statuses.items():
            host, _, pid = worker.rpartition(":")
            details.append({
                "worker": worker, "host": host, "pid": int(pid) if pid.isdigit() else None,
                "last_beat_s": alive[worker], "shares_secret": worker in sharing, **status,
            })  # fmt: skip
        return details

    def _configured_priorities(self) -> set[int]:
        return {
            self.settings.sync_priority,
            self.settings.async_priority,
            self.settings.train_priority,
        }

    async def depth_by_priority(self) -> dict[int, int]:
        """Waiting tasks by priority (those with any, and the configured defaults)."""
        configured = self._configured_priorities()
        depth = await self.redis.depth_by_priority({*PRIORITY_LEVELS, *configured})
        return {priority: depth.get(priority, 0) for priority in sorted({*configured, *depth})}

    async def update_queue_depth(self) -> None:
        """Set the queue-depth gauge from Redis, a priority level at a time."""
        configured = self._configured_priorities()
        depth = await self.redis.depth_by_priority({*PRIORITY_LEVELS, *configured})
        # The default priorities always have a series (0 while empty), so a dashboard plots
        # an empty queue; others once they were seen, then 0 once drained.
        for priority in (self._priorities_seen | configured) - set(depth):
            metrics.QUEUE_DEPTH.labels(str(priority)).set(0)
        for priority, count in depth.items():
            metrics.QUEUE_DEPTH.labels(str(priority)).set(count)
        self._priorities_seen |= set(depth)

    async def details(self) -> dict[str, Any]:
        """Everything an operator wants on one page (GET /health)."""
        redis_info: dict[str, Any]
        try:
            redis_info = {
                "ok": True,
                "latency_ms": round(await self.redis.ping_ms(), 3),
                "queue_depth": await self.redis.depth(),
                "workers": await self.workers(all_secrets=True),
            }
        except ServiceError as exc:
            redis_info = {"ok": False, "error": exc.message}
        return {
            "redis": redis_info,
            "models": {m.name: m.active for m in self.catalog.models.values()},
            "cache": self.cache.stats(),
            "enqueued": self.queue.enqueued,
            "sync_waiting": self.queue.results.waiting,
        }
