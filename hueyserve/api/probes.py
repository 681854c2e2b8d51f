"""What the API's health reads from Redis: latency, queue depth, the eviction policy and the
workers' heartbeats (hueyserve.api.health decides what they mean)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from hueyserve.api.queue import redis_errors
from hueyserve.errors import RedisUnavailable
from hueyserve.wire import EVENTS_KEY, HEARTBEATS_KEY, parse_heartbeat_member, worker_status_key


class RedisProbe:
    """Short reads over the API's pool; a Redis failure is RedisUnavailable (a 503)."""

    def __init__(self, client: aioredis.Redis, queue_key: str) -> None:
        self.client = client
        self.queue_key = queue_key

    async def ping_ms(self) -> float:
        start = time.perf_counter()
        async with redis_errors():
            await self.client.ping()
        return (time.perf_counter() - start) * 1000

    async def depth_by_priority(self, levels: Iterable[int]) -> dict[int, int]:
        """Waiting tasks at each priority level that has any (scores are negated priorities);
        one ZCOUNT per level in one round trip, however long the queue."""
        levels = sorted(set(levels))
        async with redis_errors(), self.client.pipeline(transaction=False) as pipe:
            for level in levels:
                pipe.zcount(self.queue_key, -level, -level)
            counts = await pipe.execute()
        return {level: int(n) for level, n in zip(levels, counts, strict=True) if n}

    async def eviction_policy(self) -> str | None:
        """Redis's `maxmemory-policy`, or None when CONFIG is refused (managed services)."""
        try:
            found = await self.client.config_get("maxmemory-policy")
        except redis.ResponseError:
            return None
        except (redis.RedisError, OSError, TimeoutError) as exc:
            raise RedisUnavailable(exc) from exc
        return str(found.get("maxmemory-policy")) if found else None

    async def depth(self) -> int:
        async with redis_errors():
            return int(await self.client.zcard(self.queue_key))

    async def heartbeats(self, since: float) -> list[tuple[str, str, float]]:
        """Workers that reported in since `since` (unix time): id, secret proof, last beat."""
        async with redis_errors():
            beats: list[Any] = await self.client.zrangebyscore(
                HEARTBEATS_KEY, since, "+inf", withscores=True
            )
        found = []
        for member, score in beats:
            worker, proof = parse_heartbeat_member(bytes(member).decode())
            found.append((worker, proof, float(score)))
        return found

    async def worker_statuses(self, workers: list[str]) -> dict[str, dict[str, Any]]:
        """What each worker said of itself with its last beat (running tasks, models)."""
        if not workers:
            return {}
        async with redis_errors():
            raw: list[Any] = await self.client.mget([worker_status_key(w) for w in workers])
        statuses = {}
        for worker, text in zip(workers, raw, strict=True):
            try:
                status = orjson.loads(text) if text is not None else {}
            except orjson.JSONDecodeError:  # altered in Redis: show the worker without it
                status = {}
            statuses[worker] = status if isinstance(status, dict) else {}
        return statuses

    async def event_stream(self) -> dict[str, int]:
        """The event stream's length and its memory in Redis (bytes; 0 where refused)."""
        async with redis_errors():
            length = int(await self.client.xlen(EVENTS_KEY))
            try:
                memory = int(await self.client.memory_usage(EVENTS_KEY) or 0)
            except redis.ResponseError:  # MEMORY refused (some managed services)
                memory = 0
        return {"length": length, "memory_bytes": memory}
