"""The WebSocket twin of a job's server-sent events (hueyserve.api.streams), as the articles
this project grew from deliver results: the same JSON, with its stream `id`, one message
each. The guard (hueyserve.api.guard) has checked the key or session and the Origin."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from hueyserve.api.streams import Streams
from hueyserve.errors import JobNotFound, ServiceError


async def job_socket(
    streams: Streams, socket: WebSocket, job_id: str, last_event_id: str | None
) -> None:
    """The WebSocket twin of `Streams.job`: the same JSON (with its `id`), one message each; the
    socket closes after the final one (1000), at once for a job whose end the client saw,
    with 1012 when the stream ends before the job does (come back with the last id), 4404
    for an unknown job and 1013 (try again later) when Redis is down."""
    sub = streams.feed.subscribe(job_id)
    try:
        opening = await streams.open_job(sub, job_id, last_event_id)
    except ServiceError as exc:
        streams.feed.unsubscribe(sub)
        code = 4404 if isinstance(exc, JobNotFound) else 1013
        await socket.close(code=code, reason=exc.message[:120])
        return
    except BaseException:
        streams.feed.unsubscribe(sub)
        raise
    if opening is None:
        streams.feed.unsubscribe(sub)
        await socket.close(code=1000)
        return
    streams.open_streams += 1
    ended = asyncio.Event()  # the final message went out

    async def send() -> None:
        async for message in streams.run_job(job_id, *opening):
            if message is not None:
                await socket.send_bytes(orjson.dumps({"id": message[0], **message[1]}))
                if message[1].get("final"):
                    ended.set()

    async def watch() -> None:  # a client that left is noticed now, not at the next send
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass

    tasks = {asyncio.create_task(send()), asyncio.create_task(watch())}
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # 1000 after the final message; 1012 (come back) when the stream ended before it
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            await socket.close(code=1000 if ended.is_set() or opening[2] else 1012)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        streams.feed.unsubscribe(sub)
        streams.open_streams -= 1
