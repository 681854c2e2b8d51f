"""Request latency as a Prometheus histogram (REQUEST_SECONDS in hueyserve.metrics)."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hueyserve.metrics import REQUEST_SECONDS


class RequestTimer:
    """ASGI middleware: REQUEST_SECONDS by route template (`/v1/models/{name}:predict`, so
    label values stay few), method and status; cheaper than a BaseHTTPMiddleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path_format", None) or "unmatched"
            REQUEST_SECONDS.labels(route, scope["method"], str(status)).observe(
                time.perf_counter() - started
            )
