"""Server-sent events: a job's events until it ends, and the whole
deployment's, resumable by the stream ids (`Last-Event-ID`).

Everything that can refuse a stream (unknown job: 404; a job whose end the client has seen:
204) is decided before the response starts, so the status is real. Past that point the answer
is always 200: a failure (Redis down, a client too slow to keep up, the server stopping) ends
the stream with a `retry:` hint, and the client resumes from its last id without a gap or a
duplicate. The order of a stream's start (subscribe, note the feed's position, then read
Redis) is what makes that true: see `Opening`. The WebSocket twin is hueyserve.api.sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from fastapi.sse import EventSourceResponse, format_sse_event
from starlette.responses import Response

from hueyserve.api.events import (
    ENDED_STATUSES,
    Event,
    EventFeed,
    Subscription,
    final,
    id_key,
    public,
    valid_id,
)
from hueyserve.api.jobs import JobService
from hueyserve.api.queue import redis_errors
from hueyserve.errors import JobNotFound, RedisUnavailable
from hueyserve.jobs import JobStatus
from hueyserve.wire import EVENTS_KEY, job_key

RETRY_MS = 2000  #: how soon a client should come back after a stream ended on a failure
MAX_STREAM_S = 600.0  #: a stream ends (its client resumes) after this long: none is held forever
RESULT_WAIT_S = 2.0  #: a `done` event may beat its stored result by a moment: wait this long


def sse(data: dict[str, Any] | None, *, event: str | None = None, id: str | None = None) -> bytes:
    text = None if data is None else orjson.dumps(data).decode()
    return format_sse_event(data_str=text, event=event, id=id)


def retry_later() -> bytes:
    why = "the stream ends here; reconnect with Last-Event-ID (after a final event: 204)"
    return format_sse_event(retry=RETRY_MS, comment=why)


def later(a: str, b: str) -> str:
    """The later of two stream ids."""
    return max(a, b, key=id_key)


def keepalive() -> bytes:
    return b": keep-alive\n\n"


@dataclass
class Opening:
    """A stream's start, read in this order: subscribe (every later event is queued), note
    the feed's position (every event up to it was handed out before), then read Redis (a
    snapshot, or a replay up to that position). Queued events up to `skip` are duplicates."""

    sub: Subscription
    skip: str


class Streams:
    """One per API process: opens and runs job and deployment streams on the feed."""

    def __init__(self, feed: EventFeed, jobs: JobService, keepalive_s: float) -> None:
        self.feed = feed
        self.jobs = jobs
        self.keepalive_s = keepalive_s
        self.open_streams = 0

    # --- one job --------------------------------------------------------------------------

    async def job(self, job_id: str, last_event_id: str | None) -> Response:
        """GET /v1/jobs/{id}/events: 404, 204 or a stream (see the module's docstring)."""
        sub = self.feed.subscribe(job_id)
        try:
            opening = await self.open_job(sub, job_id, last_event_id)
        except RedisUnavailable:
            self.feed.unsubscribe(sub)
            return self._retry_response()
        except BaseException:
            self.feed.unsubscribe(sub)
            raise
        if opening is None:
            self.feed.unsubscribe(sub)
            return Response(status_code=204)
        return self._response(_as_sse(self.run_job(job_id, *opening)), sub)

    async def open_job(
        self, sub: Subscription, job_id: str, last_event_id: str | None
    ) -> tuple[Opening, list[Message], bool] | None:
        """The job's opening, what it sends first and whether that includes the end; None
        for a 204 (the client has seen the end). JobNotFound for an unknown job."""
        seen = await self._position()
        async with redis_errors(), self.feed.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(job_key(job_id))
            pipe.xrevrange(EVENTS_KEY, count=1)
            pipe.xrange(EVENTS_KEY, count=1)
            raw, newest, oldest = await pipe.execute()
        record = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
        if not record:
            raise JobNotFound(job_id)
        top = newest[0][0].decode() if newest else seen
        ended = record.get("status") in ENDED_STATUSES
        after = last_event_id if last_event_id is not None and valid_id(last_event_id) else None
        if after is not None and id_key(after) > id_key(top):
            after = None  # an id the stream never had (made up): start from the state
        if after is not None and oldest and id_key(after) >= id_key(oldest[0][0].decode()):
            # Everything after the client's id is still in the stream: replay the job's part
            # (up to the end, or to the feed's position: the queue holds what is later).
            replayed: list[Message] = []
            async with redis_errors():
                async for event in self.feed.replay(after, top if ended else seen):
                    if event.job == job_id:
                        replayed.append((event.id, await self._job_data(job_id, event.fields)))
            if ended and not replayed:
                return None
            # A client may be ahead of this process's feed (it read another API process, or
            # this one's snapshot): what it has seen is never sent again.
            return Opening(sub, skip=later(top if ended else seen, after)), replayed, ended
        state = await self._job_data(job_id, dict(record, event="state"))
        return Opening(sub, skip=top), [(top, state)], ended

    async def run_job(
        self, job_id: str, opening: Opening, first: list[Message], ended: bool
    ) -> AsyncIterator[Message | None]:
        """The job's messages (None: a keep-alive is due) until its final one."""
        try:
            for message in first:
                yield message
            if ended:
                return
            async for event in self._events(opening):
                if event is None:
                    yield None
                    continue
                yield event.id, await self._job_data(job_id, event.fields)
                if final(event.fields):
                    return
        finally:
            self.feed.unsubscribe(opening.sub)

    async def _job_data(self, job_id: str, fields: dict[str, str]) -> dict[str, Any]:
        """A job message's JSON: its public fields; a final one says so and, once done,
        carries the result as GET /v1/jobs/{id} gives it."""
        data = public({**fields, "type": "job", "job": job_id})
        if final(fields):
            data["final"] = True
            if fields.get("status") == JobStatus.DONE.value:
                data["result"] = await self._result(job_id)
        return data

    async def _result(self, job_id: str) -> Any:
        """The job's result, waiting a moment for it to be stored; None if it never is."""
        deadline = time.monotonic() + RESULT_WAIT_S
        with contextlib.suppress(RedisUnavailable, JobNotFound):
            while True:
                job = await self.jobs.job(job_id)
                if job.result is not None or time.monotonic() > deadline:
                    return job.result
                await asyncio.sleep(0.05)
        return None

    # --- the whole deployment ---------------------------------------------------------------

    async def everything(self, last_event_id: str | None) -> Response:
        """GET /v1/events: every event after the client's id (or from now on)."""
        after = last_event_id if last_event_id is not None and valid_id(last_event_id) else None
        sub = self.feed.subscribe(None)
        try:
            seen = await self._position()
            oldest = newest = None
            if after is not None:
                async with redis_errors():
                    oldest, newest = await self.feed.oldest_id(), await self.feed.newest_id()
        except BaseException as exc:
            self.feed.unsubscribe(sub)
            if isinstance(exc, RedisUnavailable):
                return self._retry_response()
            raise
        if after is not None and id_key(after) > id_key(newest or seen):
            after = None  # an id the stream never had (made up): from now on
        if after is None:
            # Nothing to replay; the id alone (no data) tells the client where it stands.
            first = format_sse_event(id=seen)
        elif id_key(after) > id_key(seen):
            # Ahead of everything this process has read: another API process's newest, or
            # made up. Live from here; what it has seen is never sent twice.
            first = b""
        elif oldest is None or id_key(after) < id_key(oldest):
            why = "the events after the id given were trimmed away: read the state again"
            first, after = sse({"type": "reset", "reason": why}, event="reset", id=seen), None
        else:
            first = b""
        opening = Opening(sub, skip=seen if after is None else later(seen, after))
        return self._response(self._run_all(opening, first, after, seen), sub)

    async def _run_all(
        self, opening: Opening, first: bytes, after: str | None, seen: str
    ) -> AsyncIterator[bytes]:
        """The replay after the client's id up to the feed's position, read from Redis a
        chunk at a time (a failure ends the stream: the client resumes), then live events."""
        try:
            yield first
            if after is not None:
                async with redis_errors():
                    async for past in self.feed.replay(after, seen):
                        yield self._message(past)
            async for event in self._events(opening):
                yield keepalive() if event is None else self._message(event)
        except RedisUnavailable:
            return
        finally:
            self.feed.unsubscribe(opening.sub)

    def _message(self, event: Event) -> bytes:
        return sse(public(event.fields), event=event.type, id=event.id)

    # --- shared -------------------------------------------------------------------------------

    async def _position(self) -> str:
        """The feed's position (it has read everything up to it); RedisUnavailable while it
        cannot read the stream."""
        if self.feed.last_id is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.feed.connected.wait(), timeout=1.0)
        if self.feed.last_id is None:
            raise RedisUnavailable(redis.ConnectionError("the event stream is not readable yet"))
        return self.feed.last_id

    async def _events(self, opening: Opening) -> AsyncIterator[Event | None]:
        """The subscription's events past `skip`, None after each idle keep-alive period; ends
        when the subscription is dropped (too slow, the server stops) or after MAX_STREAM_S."""
        ends = time.monotonic() + MAX_STREAM_S
        skip = id_key(opening.skip)
        while (left := ends - time.monotonic()) > 0:
            event = await opening.sub.next(min(self.keepalive_s, left))
            if opening.sub.dropped.is_set():
                return
            if event is None:
                yield None
            elif id_key(event.id) > skip:
                yield event

    def _response(self, body: AsyncIterator[bytes], sub: Subscription) -> Response:
        async def ended_with_retry() -> AsyncIterator[bytes]:
            self.open_streams += 1
            try:
                async for chunk in body:
                    yield chunk
                yield retry_later()
            finally:
                self.open_streams -= 1

        stream = ended_with_retry()
        # If the client is gone before the body starts, the generator never runs its
        # `finally`: the subscription then goes when the generator is collected.
        weakref.finalize(stream, self.feed.unsubscribe, sub)
        return EventSourceResponse(stream, headers=_NO_BUFFERING)

    def _retry_response(self) -> Response:
        return EventSourceResponse(_once(retry_later()), headers=_NO_BUFFERING)


_NO_BUFFERING = {"cache-control": "no-cache", "x-accel-buffering": "no"}
Message = tuple[str, dict[str, Any]]  #: a stream id and the JSON sent with it


async def _as_sse(messages: AsyncIterator[Message | None]) -> AsyncIterator[bytes]:
    async for message in messages:
        yield keepalive() if message is None else sse(message[1], id=message[0])


async def _once(chunk: bytes) -> AsyncIterator[bytes]:
    yield chunk
