"""The event stream in an API process: one reader of `hueyserve:events`, fanned out to its
clients (SSE, WebSocket) and to the recent-activity window of the dashboard.

Workers and the API write each job state change in the same Lua script as the job record
(hueyserve.wire.JOB_EVENT_LUA); model and worker changes are written with theirs. Each API
process reads the stream once (XREAD from the last id it saw, so an outage or a slow turn
skips nothing) and hands each entry to the subscribers that want it: those of one job, and
those of everything. A subscriber that falls too far behind is dropped; its client resumes
from its Last-Event-ID, read back from Redis (`replay`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis

from hueyserve.jobs import ENDED
from hueyserve.wire import EVENTS_KEY

logger = logging.getLogger(__name__)

READ_BLOCK_MS = 5000  #: one XREAD waits this long for new entries
READ_COUNT = 1000  #: most entries one XREAD takes
SUBSCRIBER_BACKLOG = 10_000  #: entries a subscriber may have waiting before it is dropped
RECONNECT_S = (0.1, 2.0)  #: the reader's pause after a failure: first, most
BACKFILL_MAX = 300_000  #: most entries read back for the listeners at the start
_FEEDS: weakref.WeakSet[EventFeed] = weakref.WeakSet()


def server_stopping() -> None:
    """The HTTP server stops (hueyserve.api.protocol): end every stream now, or the server
    would wait for them; their clients come back, to this server's successor or another."""
    for feed in list(_FEEDS):
        feed.close()


def id_key(event_id: str) -> tuple[int, int]:
    """A stream id ('<ms>-<seq>') as something that sorts like it."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def valid_id(raw: str) -> bool:
    """Whether a client's Last-Event-ID is a stream id at all (two 64-bit numbers); any
    other value is taken as no id."""
    ms, _, seq = raw.partition("-")
    return _u64(ms) and (seq == "" or _u64(seq))


def _u64(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) < 2**64


ENDED_STATUSES = {status.value for status in ENDED}
#: Stream field -> the name a client sees (as GET /v1/jobs/{id} names it) and its type.
_PUBLIC: dict[str, tuple[str, Callable[[str], Any]]] = {
    "job": ("job_id", str),
    "id": ("job_id", str),
    "event": ("event", str),
    "status": ("status", str),
    "kind": ("kind", str),
    "model": ("model_name", str),
    "version": ("model_version", str),
    "priority": ("priority", int),
    "worker": ("worker", str),
    "error": ("error", str),
    "stage": ("stage", str),
    "progress": ("progress", float),
    "at": ("at", float),
    "queued_s": ("queued_s", float),
    "run_s": ("run_s", float),
    "attempts": ("attempts", int),
    "instances": ("instances", int),
    "created_at": ("created_at", float),
    "started_at": ("started_at", float),
    "finished_at": ("finished_at", float),
    "active": ("active", str),
}


def public(fields: dict[str, str]) -> dict[str, Any]:
    """A stream entry or a job record as the JSON clients get (unknown fields left out)."""
    out: dict[str, Any] = {"type": fields.get("type", "job")}
    for name, raw in fields.items():
        known = _PUBLIC.get(name)
        if known is None:
            continue
        try:
            out[known[0]] = known[1](raw)
        except ValueError:  # altered in Redis: leave it out rather than fail the stream
            continue
    return out


def final(fields: dict[str, str]) -> bool:
    """Whether a job event is its last: the job has ended (progress events never end one)."""
    return fields.get("status") in ENDED_STATUSES and fields.get("event") != "progress"


@dataclass
class Event:
    """One stream entry: its id and its fields (all text)."""

    id: str
    fields: dict[str, str]

    @property
    def type(self) -> str:
        return self.fields.get("type", "job")

    @property
    def job(self) -> str | None:
        return self.fields.get("job")


def _text(value: bytes | str) -> str:
    """Entries are UTF-8; one written by hand may not be: it is read, not refused."""
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _event(raw_id: bytes | str, raw: dict[Any, Any]) -> Event:
    return Event(_text(raw_id), {_text(k): _text(v) for k, v in raw.items()})


@dataclass(eq=False)
class Subscription:
    """A client's view of the feed: the events it wants, queued for it; `dropped` once it
    fell too far behind or the feed stopped (its stream then ends and the client resumes)."""

    job: str | None  #: one job's events, or None for all
    queue: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(SUBSCRIBER_BACKLOG))
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, event: Event) -> bool:
        """Queue the event; False (and dropped) when too many wait already."""
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped.set()
            return False
        return True

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None when `timeout_s` passed without one (or it was dropped)."""
        if self.dropped.is_set():
            return None
        getting = asyncio.ensure_future(self.queue.get())
        dropping = asyncio.ensure_future(self.dropped.wait())
        try:
            await asyncio.wait(
                {getting, dropping}, timeout=timeout_s, return_when="FIRST_COMPLETED"
            )
        finally:
            dropping.cancel()
            if not getting.done():
                getting.cancel()
        return getting.result() if getting.done() and not getting.cancelled() else None


class EventFeed:
    """One per API process. `run` reads the stream until cancelled; `subscribe` hands a
    client every later event it wants; `listeners` get every event (the activity window)."""

    def __init__(
        self, client: aioredis.Redis, reader: aioredis.Redis, backfill_s: float = 0.0
    ) -> None:
        self.client = client  #: the shared pool: replays and snapshots
        self.reader = reader  #: its own connection, without a read timeout shorter than a block
        self.last_id: str | None = None  #: the newest entry handed out
        self.backfill_s = backfill_s  #: listeners get this much of the past at the start
        self.connected = asyncio.Event()
        self.listeners: list[Callable[[Event], None]] = []
        self._by_job: dict[str, set[Subscription]] = {}
        self._all: set[Subscription] = set()
        self.closed = False
        _FEEDS.add(self)

    def close(self) -> None:
        """Drop every subscription, and every later one at once."""
        self.closed = True
        for sub in [*self._all, *(s for group in self._by_job.values() for s in group)]:
            sub.dropped.set()
            self.unsubscribe(sub)

    def subscribe(self, job: str | None = None) -> Subscription:
        """A new Subscription: every event dispatched from now on that it wants is queued
        for it, until `unsubscribe` (or it is dropped)."""
        sub = Subscription(job)
        if self.closed:
            sub.dropped.set()
        (self._all if job is None else self._by_job.setdefault(job, set())).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        group = self._all if sub.job is None else self._by_job.get(sub.job, set())
        group.discard(sub)
        if sub.job is not None and not group:
            self._by_job.pop(sub.job, None)

    @property
    def subscribers(self) -> int:
        return len(self._all) + sum(len(group) for group in self._by_job.values())

    async def run(self) -> None:
        pause = RECONNECT_S[0]
        while True:
            try:
                if self.last_id is None:
                    newest = await self.newest_id(self.reader) or "0-0"
                    await self._backfill(newest)
                    self.last_id = newest
                self.connected.set()
                answer: Any = await self.reader.xread(
                    {EVENTS_KEY: self.last_id}, count=READ_COUNT, block=READ_BLOCK_MS
                )
                pause = RECONNECT_S[0]
            except asyncio.CancelledError:
                raise
            except (redis.RedisError, OSError) as exc:
                if self.connected.is_set():
                    logger.warning("event stream: cannot read (%s); retrying", exc)
                self.connected.clear()
                await asyncio.sleep(pause)
                pause = min(pause * 2, RECONNECT_S[1])
                continue
            for _, entries in answer or ():
                for raw_id, raw in entries:
                    self._dispatch_safely(raw_id, raw)

    def _dispatch_safely(self, raw_id: Any, raw: Any) -> None:
        """An entry written by hand (not UTF-8, a field that does not parse) is skipped and
        logged; it never stops the reader, or every stream would go quiet."""
        try:
            self.dispatch(_event(raw_id, raw))
        except Exception:
            logger.exception("event stream: entry %r skipped", raw_id)
            self.last_id = _text(raw_id)

    def dispatch(self, event: Event) -> None:
        self.last_id = event.id
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a bad entry must not stop the clients' events
                logger.warning("event %s: not counted (%r)", event.id, event.fields)
        wanting = list(self._all)
        if event.job is not None:
            wanting += self._by_job.get(event.job, ())
        for sub in wanting:
            if not sub.offer(event):  # too far behind: its client resumes from Redis
                self.unsubscribe(sub)

    async def _backfill(self, until: str) -> None:
        """Hand the listeners (not the subscribers) the last `backfill_s` seconds."""
        if not self.listeners or self.backfill_s <= 0:
            return
        since = int((time.time() - self.backfill_s) * 1000)
        start, read = f"{since}-0", 0
        while read < BACKFILL_MAX:
            entries: Any = await self.reader.xrange(EVENTS_KEY, start, until, count=READ_COUNT)
            for raw_id, raw in entries:
                event = _event(raw_id, raw)
                for listener in self.listeners:
                    listener(event)
            read += len(entries)
            if len(entries) < READ_COUNT:
                return
            start = f"({_event(*entries[-1]).id}"

    async def newest_id(self, client: aioredis.Redis | None = None) -> str | None:
        """The id of the stream's newest entry (None: the stream is empty)."""
        newest: Any = await (client or self.client).xrevrange(EVENTS_KEY, count=1)
        return _event(*newest[0]).id if newest else None

    async def oldest_id(self) -> str | None:
        oldest: Any = await self.client.xrange(EVENTS_KEY, count=1)
        return _event(*oldest[0]).id if oldest else None

    async def replay(self, after: str, until: str, chunk: int = 1000) -> AsyncIterator[Event]:
        """Every entry after `after` up to `until` (both ids), read back in chunks."""
        start = f"({after}"
        while True:
            entries: Any = await self.client.xrange(EVENTS_KEY, start, until, count=chunk)
            for raw_id, raw in entries:
                yield _event(raw_id, raw)
            if len(entries) < chunk:
                return
            start = f"({_event(*entries[-1]).id}"
