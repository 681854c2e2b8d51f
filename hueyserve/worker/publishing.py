"""Publishing models: which version of each is active, decided here and written to Redis.

The periodic refresh makes the newest version on disk active unless an operator pinned one
(reload with an explicit version). A version that does not load is never made active: the old
one keeps serving. Workers change entries under a Redis lock, so a refresh and a reload on two
consumers cannot undo each other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from hueyserve.models import ModelEntry, parse_entries
from hueyserve.wire import MODELS_CHANNEL, MODELS_KEY, MODELS_LOCK_KEY
from hueyserve.worker.registry import ModelRegistry
from hueyserve.worker.store import ModelStore

logger = logging.getLogger(__name__)


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


class PromotionError(RuntimeError):
    """The version asked for cannot be made active; the message says why."""


class Promoter:
    def __init__(self, conn: redis.Redis, store: ModelStore, registry: ModelRegistry) -> None:
        self.conn = conn
        self.store = store
        self.registry = registry

    def refresh(self, names: list[str] | None = None) -> dict[str, str]:
        """Publish every model on disk (or those named) with its newest loadable version active,
        pinned ones left alone; returns {name: version} of those whose active version changed."""
        changed = {}
        with self._locked():
            current = entries(self.conn)
            if names is None:
                self._withdraw_missing(current)
            for name in names or self.store.names():
                old = current.get(name)
                keep = old.active if old and old.pinned else None
                entry = self._entry(name, old, keep=keep)
                if entry is not None and (old is None or old.active != entry.active):
                    changed[name] = entry.active
        return changed

    def publish_new(self, name: str) -> ModelEntry:
        """After a training: publish `name` with its new version, which becomes active unless
        an operator pinned another one (their choice stands)."""
        self.refresh([name])
        return entries(self.conn)[name]

    def promote(
        self, name: str, version: str | None = None
    ) -> tuple[ModelEntry | None, ModelEntry]:
        """Make `version` active and pin it there, or with None the newest, unpinned; returns
        the entry before and after."""
        with self._locked():
            old = entries(self.conn).get(name)
            if version is not None:
                if version not in self.store.versions(name):
                    raise PromotionError(f"model {name!r} has no version {version!r} on disk")
                try:
                    self.registry.get(name, version)
                except Exception as exc:
                    raise PromotionError(
                        f"{name} version {version} does not load ({exc}); the active version "
                        "stays as it was"
                    ) from exc
            entry = self._entry(name, old, keep=version, pinned=version is not None)
            if entry is None:
                raise PromotionError(f"model {name!r} has no version that loads")
            return old, entry

    def _entry(
        self, name: str, old: ModelEntry | None, *, keep: str | None, pinned: bool | None = None
    ) -> ModelEntry | None:
        """Build the entry from disk, publish it if anything changed, return it."""
        versions = {v: self.store.metadata(name, v) for v in self.store.versions(name)}
        if keep not in versions:
            keep = None
        active = keep or self._newest_loadable(name, list(versions), old)
        if active is None:
            return None
        entry = ModelEntry(
            name, active, versions, pinned=keep is not None if pinned is None else pinned
        )
        if entry != old:
            publish(self.conn, entry)
            if old is None or old.active != active:
                logger.info("model %s: version %s is now active", name, active)
        return entry

    def _withdraw_missing(self, current: dict[str, ModelEntry]) -> None:
        """Unpublish models whose folder is gone from the store (in-memory ones stay)."""
        kept = set(self.store.names()) | self.registry.in_memory_names()
        for name in sorted(set(current) - kept):
            logger.warning("model %s is gone from the store; unpublishing it", name)
            withdraw(self.conn, name)

    def _newest_loadable(
        self, name: str, versions: list[str], old: ModelEntry | None
    ) -> str | None:
        for version in reversed(versions):
            if old is not None and version == old.active:
                return version  # serving already
            try:
                self.registry.get(name, version)
                return version
            except Exception:
                logger.exception("%s version %s does not load; skipping it", name, version)
        return None

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self.conn.lock(MODELS_LOCK_KEY, timeout=60, blocking_timeout=30):
            yield
