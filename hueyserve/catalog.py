"""Which version of each model is active, shared through Redis.

Workers publish (the refresh task promotes the newest version on disk); API processes keep a
local copy, pushed by pub/sub and reread in full every few seconds in case a message was
missed, so validating a request or answering from cache needs no Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from hueyserve.errors import ModelNotFound

logger = logging.getLogger(__name__)

MODELS_KEY = "hueyserve:models"  #: hash name -> JSON {"name", "version", "metadata"}
MODELS_CHANNEL = "hueyserve:models:changed"  #: pub/sub: the same JSON on every promotion


@dataclass(frozen=True)
class ActiveModel:
    """The version of a model that new requests go to, and what it expects."""

    name: str
    version: str
    metadata: dict[str, Any]

    @property
    def n_features(self) -> int:
        return int(self.metadata["n_features"])

    @property
    def features(self) -> list[str]:
        return list(self.metadata.get("features") or [])

    def to_json(self) -> bytes:
        return orjson.dumps({"name": self.name, "version": self.version, "metadata": self.metadata})

    @classmethod
    def from_json(cls, raw: bytes | str) -> ActiveModel:
        data = orjson.loads(raw)
        return cls(data["name"], str(data["version"]), data["metadata"])


def publish(conn: redis.Redis, model: ActiveModel) -> None:
    """Make `model` the active version everywhere (worker side)."""
    payload = model.to_json()
    with conn.pipeline() as pipe:
        pipe.hset(MODELS_KEY, model.name, payload)
        pipe.publish(MODELS_CHANNEL, payload)
        pipe.execute()


def active_versions(conn: redis.Redis) -> dict[str, str]:
    """Model name -> active version, in one round trip (worker side)."""
    entries = conn.hgetall(MODELS_KEY)
    return {(m := ActiveModel.from_json(raw)).name: m.version for raw in entries.values()}


class ModelCatalog:
    """The API's local view of the active models (asyncio)."""

    def __init__(self, client: aioredis.Redis, *, resync_s: float) -> None:
        self.client = client
        self.resync_s = resync_s
        self.models: dict[str, ActiveModel] = {}
        self.synced_at: float | None = None
        self.outage = False

    def get(self, name: str) -> ActiveModel:
        model = self.models.get(name)
        if model is None:
            raise ModelNotFound(name, list(self.models))
        return model

    async def resync(self) -> None:
        entries = await self.client.hgetall(MODELS_KEY)
        if not entries and self.models:
            # Redis lost its data (restart without persistence); workers republish within a
            # heartbeat. Until then the last known versions are better than 404s.
            self.synced_at = time.monotonic()
            return
        self.models = {(m := ActiveModel.from_json(raw)).name: m for raw in entries.values()}
        self.synced_at = time.monotonic()

    async def follow(self) -> None:
        """Apply promotions as they are published; run as a background task until cancelled."""
        while True:
            try:
                await self._follow_once()
            except (redis.RedisError, OSError) as exc:
                if not self.outage:  # once per outage, not every second
                    logger.warning("model catalog lost Redis (%s); keeping last versions", exc)
                self.outage = True
                await asyncio.sleep(1.0)

    async def _follow_once(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(MODELS_CHANNEL)
            await self.resync()  # after subscribing, so no promotion falls in between
            if self.outage:
                logger.info("model catalog reconnected to Redis")
                self.outage = False
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    model = ActiveModel.from_json(message["data"])
                    self.models = {**self.models, model.name: model}
                    logger.info("model %s: version %s is now active", model.name, model.version)
                if self.synced_at is None or time.monotonic() - self.synced_at > self.resync_s:
                    await self.resync()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
