"""Publishing models: the catalog's entries in Redis, and which version of each is active.

Entries change only under the models lock (hueyserve.worker.repository.ModelRepository.locked),
so a training, an import, a reload and a delete on two consumers cannot undo each other. A
version that does not load here is never made active: the old one keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import orjson
import redis

from hueyserve.models import ModelEntry, parse_entries
from hueyserve.wire import EVENTS_KEY, MODELS_CHANNEL, MODELS_KEY
from hueyserve.worker.registry import ModelRegistry

logger = logging.getLogger(__name__)


def publish(conn: redis.Redis, entry: ModelEntry) -> None:
    """Make `entry` what every API process sees (and a `model` event for dashboards)."""
    payload = entry.to_json()
    with conn.pipeline() as pipe:
        pipe.hset(MODELS_KEY, entry.name, payload)
        pipe.publish(MODELS_CHANNEL, payload)
        _model_event(pipe, "published", entry.name, active=entry.active)
        pipe.execute()


def withdraw(conn: redis.Redis, name: str) -> None:
    """Stop serving `name`: every API process drops it at once."""
    with conn.pipeline() as pipe:
        pipe.hdel(MODELS_KEY, name)
        pipe.publish(MODELS_CHANNEL, orjson.dumps({"deleted": name}))
        _model_event(pipe, "deleted", name)
        pipe.execute()


def _model_event(pipe: redis.client.Pipeline, event: str, name: str, **extra: str) -> None:
    """Rare: the stream is trimmed by the job events that follow (they know its length)."""
    fields = {"type": "model", "event": event, "model": name, "at": time.time(), **extra}
    pipe.xadd(EVENTS_KEY, fields)  # type: ignore[arg-type]


def entries(conn: redis.Redis) -> dict[str, ModelEntry]:
    """Every published model, in one round trip."""
    return parse_entries(conn.hgetall(MODELS_KEY))


class PromotionError(RuntimeError):
    """The version asked for cannot be made active; the message says why."""


class Promoter:
    def __init__(
        self,
        conn: redis.Redis,
        registry: ModelRegistry,
        locked: Callable[[], AbstractContextManager[None]],
    ) -> None:
        self.conn = conn
        self.registry = registry
        self.locked = locked

    def entry(self, name: str) -> ModelEntry:
        found = entries(self.conn).get(name)
        if found is None:
            raise PromotionError(f"no model {name!r} in the catalog")
        return found

    def promote(
        self, name: str, version: str | None = None
    ) -> tuple[ModelEntry | None, ModelEntry]:
        """Make `version` active and pin it there, or with None the newest, unpinned; returns
        the entry before and after. The version is loaded here first."""
        found = self.entry(name)
        chosen = version or found.version_list()[-1]
        if chosen not in found.versions:
            raise PromotionError(f"model {name!r} has no version {chosen!r}")
        try:  # loaded here first, outside the lock: a large model may take a while
            self.registry.get(name, chosen)
        except Exception as exc:
            raise PromotionError(
                f"{name} version {chosen} does not load ({exc}); the active version stays as it was"
            ) from exc
        with self.locked():
            old = entries(self.conn).get(name)
            if old is None or chosen not in old.versions:
                raise PromotionError(f"{name} version {chosen} was deleted meanwhile")
            if version is None:  # "the newest": a version added meanwhile is newer still
                chosen = max(chosen, old.version_list()[-1], key=int)
            entry = ModelEntry(name, chosen, old.versions, pinned=version is not None)
            if entry != old:
                publish(self.conn, entry)
                if old.active != chosen:
                    logger.info("model %s: version %s is now active", name, chosen)
            return old, entry
