"""Waiting for results without a thread or a connection per request.

Each API process subscribes once to its own channel and names it in the tasks it waits for
(`reply_to`). When a worker has stored such a job's result, it publishes the job id and the
serialized result there (`wire.result_message`, from hueyserve.worker.lifecycle); the
listener resolves the waiting future. A thousand waiting requests are a thousand futures.

Pub/sub drops messages while a subscriber is disconnected, so a lost subscription fails
every waiting request at once (503 with its job id: the job goes on and can be read), and
requests are refused until the listener has subscribed again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import redis
import redis.asyncio as aioredis

from hueyserve.errors import RedisUnavailable, ServiceUnavailable
from hueyserve.wire import RESULT_CHANNEL_PREFIX, parse_result_message

logger = logging.getLogger(__name__)


class ResultListener:
    """One per API process: futures by task id, resolved from one pub/sub subscription."""

    def __init__(self, subscriber: aioredis.Redis, *, max_waiting: int) -> None:
        self.subscriber = subscriber
        self.max_waiting = max_waiting
        self.channel = RESULT_CHANNEL_PREFIX + uuid.uuid4().hex
        self.connected = asyncio.Event()
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def expect(self, task_id: str) -> None:
        """Register interest before enqueueing, so no answer can arrive unseen."""
        if not self.connected.is_set():
            raise RedisUnavailable(ConnectionError("not subscribed to result notifications"))
        if len(self._waiting) >= self.max_waiting:
            raise ServiceUnavailable(
                f"{len(self._waiting)} requests are already waiting in this API process "
                "(HUEYSERVE_MAX_SYNC_WAITERS); retry shortly or submit an async job"
            )
        self._waiting[task_id] = asyncio.get_running_loop().create_future()

    def forget(self, task_id: str) -> None:
        future = self._waiting.pop(task_id, None)
        if future is not None and future.done() and not future.cancelled():
            future.exception()  # seen: asyncio would log an unretrieved one

    async def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        """The serialized result once it is stored, None on timeout. Raises
        RedisUnavailable if the subscription is lost meanwhile."""
        future = self._waiting[task_id]
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            return None
        finally:
            self.forget(task_id)

    async def run(self) -> None:
        """Subscribe and resolve futures until cancelled, reconnecting after Redis failures."""
        outage = False
        while True:
            try:
                await self._listen()
            except Exception as exc:  # Redis gone, or our own bug: never stop listening
                self.connected.clear()
                if not outage:
                    logger.warning("result listener lost its subscription (%s); resubscribing", exc)
                outage = True
                self._fail_all(exc)
                await asyncio.sleep(0.2)

    async def _listen(self) -> None:
        pubsub = self.subscriber.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            self.connected.set()
            while True:
                # Wakes at once on a message; the 1 s bound keeps reads within the socket
                # timeout and notices a dead connection.
                message = await pubsub.get_message(timeout=1.0)
                if message is not None:
                    self._resolve(*parse_result_message(bytes(message["data"])))
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _resolve(self, task_id: str, payload: bytes) -> None:
        future = self._waiting.get(task_id)
        if future is not None and not future.done():
            future.set_result(payload)

    def _fail_all(self, cause: Exception) -> None:
        error = RedisUnavailable(
            cause
            if isinstance(cause, redis.RedisError | OSError)
            else ConnectionError(f"result listener failed: {cause!r}")
        )
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
