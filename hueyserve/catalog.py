"""The models, their versions and which version is active, shared through Redis.

Workers publish an entry per model (hueyserve.promotion decides what is active); API
processes keep a local copy, pushed by pub/sub and reread in full every few seconds in case a
message was missed, so validating a request, answering from cache or describing a model needs
no Redis round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis

from hueyserve.errors import ModelNotFound, VersionNotFound

logger = logging.getLogger(__name__)

MODELS_KEY = "hueyserve:models"  #: hash: name -> ModelEntry JSON
MODELS_CHANNEL = "hueyserve:models:changed"  #: pub/sub: the same JSON on every change
LOCK_KEY = "hueyserve:models:lock"  #: held by a worker while it changes an entry


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model and what it takes and gives (its saved metadata)."""

    name: str
    version: str
    metadata: dict[str, Any]
    active: bool = False

    @property
    def n_features(self) -> int:
        return int(self.metadata["n_features"])

    @property
    def features(self) -> list[str]:
        return list(self.metadata.get("features") or [])

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """Input tensors (name, datatype, shape); models saved without them take one."""
        default = [{"name": "features", "datatype": "FP64", "shape": [-1, self.n_features]}]
        return list(self.metadata.get("inputs") or default)

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """Output tensors; for models saved without them, what LoadedModel.predict gives."""
        if self.metadata.get("outputs"):
            return list(self.metadata["outputs"])
        classes = self.classes
        if self.metadata.get("task") != "classification" or not classes:
            return [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
        return [
            {"name": "predict", "datatype": label_datatype(classes), "shape": [-1]},
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(classes)]},
        ]

    @property
    def classes(self) -> list[Any] | None:
        """Class labels in the order of `predict_proba`, for a classifier."""
        return self.metadata.get("classes")


def label_datatype(classes: list[Any]) -> str:
    """The v2 datatype of a classifier's labels."""
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in classes):
        return "FP64"
    return "BYTES"


@dataclass(frozen=True)
class ModelEntry:
    """A model: the metadata of every version, and the active one. `pinned` means an operator
    chose the active version (reload); the periodic refresh then leaves it alone."""

    name: str
    active: str
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    pinned: bool = False

    def get(self, version: str | None = None) -> ModelVersion:
        """The active version, or the one asked for."""
        chosen = self.active if version is None else version
        metadata = self.versions.get(chosen)
        if metadata is None:
            raise VersionNotFound(self.name, chosen, list(self.versions))
        return ModelVersion(self.name, chosen, metadata, active=chosen == self.active)

    def version_list(self) -> list[str]:
        return sorted(self.versions, key=int)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "name": self.name,
                "active": self.active,
                "versions": self.versions,
                "pinned": self.pinned,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelEntry:
        data = orjson.loads(raw)
        return cls(data["name"], str(data["active"]), data["versions"], bool(data["pinned"]))


# --- worker side (synchronous Redis) --------------------------------------------------------


def publish(conn: redis.Redis, entry: ModelEntry) -> None:
    """Make `entry` what every API process sees."""
    payload = entry.to_json()
    with conn.pipeline() as pipe:
        pipe.hset(MODELS_KEY, entry.name, payload)
        pipe.publish(MODELS_CHANNEL, payload)
        pipe.execute()


def withdraw(conn: redis.Redis, name: str) -> None:
    """Stop serving `name`; API processes drop it at their next full reread."""
    conn.hdel(MODELS_KEY, name)


def entries(conn: redis.Redis) -> dict[str, ModelEntry]:
    """Every published model, in one round trip."""
    return parse_entries(conn.hgetall(MODELS_KEY))


def parse_entries(found: Mapping[Any, bytes | str]) -> dict[str, ModelEntry]:
    """Entries by name; one that does not parse (written by an older release, say) is left
    out, so the workers' refresh publishes it again in today's format."""
    parsed = {}
    for raw in found.values():
        try:
            entry = ModelEntry.from_json(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a model entry in an unknown format: %.80r", raw)
            continue
        parsed[entry.name] = entry
    return parsed


# --- API side (asyncio) ------------------------------------------------------------------------


class ModelCatalog:
    """The API's local view of the published models."""

    def __init__(self, client: aioredis.Redis, *, resync_s: float) -> None:
        self.client = client
        self.resync_s = resync_s
        self.models: dict[str, ModelEntry] = {}
        self.synced_at: float | None = None
        self.outage = False

    def entry(self, name: str) -> ModelEntry:
        found = self.models.get(name)
        if found is None:
            raise ModelNotFound(name, list(self.models))
        return found

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The active version of `name`, or the version asked for; 404 errors otherwise."""
        return self.entry(name).get(version)

    async def resync(self) -> None:
        found = await self.client.hgetall(MODELS_KEY)
        if not found and self.models:
            # Redis lost its data (restart without persistence); workers republish within a
            # heartbeat. Until then the last known versions are better than 404s.
            self.synced_at = time.monotonic()
            return
        self.models = parse_entries(found)
        self.synced_at = time.monotonic()

    def apply(self, entry: ModelEntry) -> None:
        """Take a change at once (pub/sub, or the answer of a reload this process asked for)."""
        previous = self.models.get(entry.name)
        self.models = {**self.models, entry.name: entry}
        if previous is None or previous.active != entry.active:
            logger.info("model %s: version %s is now active", entry.name, entry.active)

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
                    for entry in parse_entries({"message": message["data"]}).values():
                        self.apply(entry)
                if self.synced_at is None or time.monotonic() - self.synced_at > self.resync_s:
                    await self.resync()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
