"""The answer cache: repeated v1 predict bodies answered before FastAPI, the cheapest hit.

The v1 predict route keeps each answer it renders under the exact body it answered and the
model version (`AnswerCache.keep`). `CachedAnswers`, an ASGI middleware, reads the body of a
v1 predict request first and, when that body was answered before for the version that serves
it now, sends the same bytes back at once: no routing, no dependency injection, no parsing, no
Redis, and no await beyond reading the body and sending the answer. Anything else (a miss, an
async request, a body too large to keep) goes on to FastAPI with the body replayed, so the
route sees exactly what the client sent.

Answers share the prediction LRU with parsed inputs (hueyserve.cache); the version in the key
keeps answers of an old version from ever being served.
"""

from __future__ import annotations

from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hueyserve.api.catalog import ModelCatalog
from hueyserve.api.paths import V1_PREDICT, V1_PREDICT_VERSION
from hueyserve.cache import CacheKey, PredictionCache
from hueyserve.errors import ServiceError
from hueyserve.models import ModelVersion

MAX_KEPT_BODY = 64 * 1024  #: larger v1 bodies are not kept as cache keys
#: The routes served from this cache, as (template, regex of the path).
ROUTES = [(template, compile_path(template)[0]) for template in (V1_PREDICT, V1_PREDICT_VERSION)]


class AnswerCache:
    """Rendered v1 answers by (model, version, exact body), in the API's prediction LRU."""

    def __init__(self, cache: PredictionCache, catalog: ModelCatalog) -> None:
        self.cache = cache
        self.catalog = catalog

    def find(
        self, name: str, version: str | None, body: bytes
    ) -> tuple[ModelVersion, bytes] | None:
        """The model version that serves the request now and the answer it gave this body."""
        try:
            model = self.catalog.get(name, version)
        except ServiceError:  # unknown model or version: the route says so
            return None
        content = self.cache.get(_key(model, body), count_miss=False)
        return None if content is None else (model, content)

    def keep(self, model: ModelVersion, body: bytes, content: bytes) -> None:
        if len(body) <= MAX_KEPT_BODY:
            self.cache.put(_key(model, body), content)


def _key(model: ModelVersion, body: bytes) -> CacheKey:
    return ("v1 body", model.name, model.version, body)


class CachedAnswers:
    """ASGI middleware in front of FastAPI; finds the AnswerCache on `app.state.services`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._routes: dict[str, Any] = {}  # template -> FastAPI's route, for the metric

    def _route(self, app: Any, template: str) -> Any:
        """The route FastAPI would have matched, found by its path (once, not on every hit)."""
        if template not in self._routes:
            self._routes[template] = next(r for r in app.routes if r.path == template)
        return self._routes[template]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = None
        if scope["type"] == "http" and scope["method"] == "POST":
            match = next(
                ((t, m) for t, regex in ROUTES if (m := regex.fullmatch(scope["path"]))), None
            )
        services = getattr(scope["app"].state, "services", None)
        if match is None or services is None or not _plain_json(scope["headers"]):
            await self.app(scope, receive, send)
            return
        template, params = match
        first, body = await _read(receive)
        found = None
        if body is not None:
            found = services.answers.find(params["name"], params.groupdict().get("version"), body)
        if found is None:
            await self.app(scope, _replay(first, receive), send)
            return
        model, content = found
        scope["route"] = self._route(scope["app"], template)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(content)).encode()),
            (b"x-cache", b"hit"),
            (b"x-model-version", model.version.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": content})


def _plain_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """A sync request with a JSON body as is (no Prefer, no content encoding), and no header
    the route would have to check (an Idempotency-Key)."""
    for name, value in headers:
        if name == b"content-type" and value.split(b";")[0].strip().lower() != b"application/json":
            return False
        if name in (b"prefer", b"content-encoding", b"idempotency-key"):
            return False
    return True


async def _read(receive: Receive) -> tuple[Message, bytes | None]:
    """The body as one message, and its bytes (None when too large or not a body)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message, None  # the client went away: the app will see it
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = bool(message.get("more_body"))
        if not more or size > MAX_KEPT_BODY:
            body = b"".join(chunks)
            whole = {"type": "http.request", "body": body, "more_body": more}
            return whole, None if more else body


def _replay(first: Message, receive: Receive) -> Receive:
    pending: list[Message] = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed
