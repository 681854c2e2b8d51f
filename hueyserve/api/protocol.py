"""uvicorn's HTTP protocol with a bound on how long a request's headers may take.

uvicorn times out idle keep-alive connections but not a request whose headers trickle in: a
client sending one byte now and then holds a connection (and its memory) forever, and a few
hundred of them starve the server. Run uvicorn with this protocol (`make run` does):

    uvicorn main:app --http hueyserve.api.protocol:TimedHttpProtocol

A request's headers must be complete within HUEYSERVE_HEADER_TIMEOUT_S of its first byte (or
of the connection, for the first request); otherwise it gets a 408 and the connection closes.
The body has its own bound, HUEYSERVE_BODY_TIMEOUT_S, kept by the guard (hueyserve.api.guard).
When the server stops, it ends the event streams (hueyserve.api.events), which would hold it.
On the internet, put a proxy in front anyway (the README says how).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hueyserve.api.events import server_stopping
from hueyserve.settings import settings

_BODY = b'{"error": "the request headers took too long: send them all at once"}'
TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: " + str(len(_BODY)).encode() + b"\r\n\r\n" + _BODY
)


class TimedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering 408 to headers that take too long."""

    header_timeout_s = settings.header_timeout_s

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._headers_due: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a request on a kept-alive connection: its headers start now

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def shutdown(self) -> None:
        """The server stops: event streams end now (their clients resume elsewhere), so that
        uvicorn, which waits for every response to finish, does not wait for them."""
        server_stopping()
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._headers_due = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        if self._headers_due is not None:
            self._headers_due.cancel()
            self._headers_due = None

    def _too_slow(self) -> None:
        self._headers_due = None
        if self.cycle is not None and not self.cycle.response_complete:
            # A request is being answered; the next one (pipelined) may have begun: its
            # headers get another full period, checked again then.
            self._arm()
            return
        if not self.transport.is_closing():
            self.transport.write(TIMEOUT_ANSWER)
            self.transport.close()
