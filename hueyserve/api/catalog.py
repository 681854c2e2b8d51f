"""The API's local view of the published models (hueyserve.models entries).

Workers publish an entry per model; each API process keeps a copy, pushed by pub/sub and
reread in full every few seconds in case a message was missed, so validating a request,
answering from cache or describing a model needs no Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import orjson
import redis
import redis.asyncio as aioredis

from hueyserve.errors import ModelNotFound, ServiceUnavailable
from hueyserve.models import ModelEntry, ModelVersion, parse_entries
from hueyserve.wire import MODELS_CHANNEL, MODELS_KEY, VERSIONS_KEY

logger = logging.getLogger(__name__)


class ModelCatalog:
    """The API's local view of the published models."""

    def __init__(self, client: aioredis.Redis, *, resync_s: float) -> None:
        self.client = client
        self.resync_s = resync_s
        self.models: dict[str, ModelEntry] = {}
        self.synced_at: float | None = None
        self.outage = False

    def entry(self, name: str) -> ModelEntry:
        """The model `name`: 404 when Redis says there is no such model, 503 when Redis could
        not be read (a client should retry, not give up on a model that may well exist)."""
        found = self.models.get(name)
        if found is not None:
            return found
        if self.synced_at is None or self.outage:
            raise ServiceUnavailable(
                f"the model catalog (Redis) cannot be read, so model {name!r} cannot be "
                "looked up; try again shortly"
            )
        raise ModelNotFound(name, list(self.models))

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The active version of `name`, or the version asked for; 404 errors otherwise."""
        return self.entry(name).get(version)

    async def resync(self) -> None:
        found = await self.client.hgetall(MODELS_KEY)
        if not found and self.models and not await self.client.exists(VERSIONS_KEY):
            # Redis lost its data (restart without persistence): workers republish within a
            # heartbeat; until then the last known versions are better than 404s. (With the
            # version counts still there, the last model was deleted on purpose.)
            self.synced_at = time.monotonic()
            return
        parsed = parse_entries(found)
        for raw_name in found:  # an entry that does not check out: keep what we had of it
            name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
            if name not in parsed and name in self.models:
                parsed[name] = self.models[name]
        self.models = parsed
        self.synced_at = time.monotonic()

    def apply(self, entry: ModelEntry) -> None:
        """Take a change at once (pub/sub, or the answer of a reload this process asked for)."""
        previous = self.models.get(entry.name)
        self.models = {**self.models, entry.name: entry}
        if previous is None or previous.active != entry.active:
            logger.info("model %s: version %s is now active", entry.name, entry.active)

    def _take(self, data: bytes) -> None:
        """A published change: an entry, or a model deleted."""
        try:
            deleted = orjson.loads(data).get("deleted")
        except (orjson.JSONDecodeError, AttributeError):
            deleted = None
        if isinstance(deleted, str):
            models = dict(self.models)
            if models.pop(deleted, None) is not None:
                self.models = models
                logger.info("model %s deleted", deleted)
            return
        for entry in parse_entries({"message": data}).values():
            self.apply(entry)

    async def follow(self) -> None:
        """Apply changes as they are published; run as a background task until cancelled."""
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
            await self.resync()  # after subscribing, so no change falls in between
            if self.outage:
                logger.info("model catalog reconnected to Redis")
                self.outage = False
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._take(message["data"])
                if self.synced_at is None or time.monotonic() - self.synced_at > self.resync_s:
                    await self.resync()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
