"""Who gets in and how much they may send: API keys and the body size limit, checked before
anything else reads the request (an ASGI middleware, outside the cache's hot path).

Keys are optional. With none configured, every route is open. With `HUEYSERVE_API_KEYS` or
`HUEYSERVE_ADMIN_KEYS` set, a request names its key in `Authorization: Bearer <key>` or
`X-API-Key: <key>`, and the route table (hueyserve.api.paths) says what it needs:
- the probes, metrics, the server metadata and the docs stay open (probes and scrapers hold no
  key), but readiness tells its reasons, and `/health` its details, to an admin key only;
- training, reloads and purging the queue need an admin key;
- everything else (models, predict, infer, jobs) needs a predict key or an admin key.
A browser page may instead hold a session cookie (hueyserve.api.sessions), good for reads
(GET, and WebSockets, which open with a GET). A WebSocket from a browser must also come from
this server's own origin, or one listed in HUEYSERVE_ALLOWED_ORIGINS: a cookie travels with a
socket opened by any site's page, so the origin is what tells the dashboard from another site.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from urllib.parse import urlsplit

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hueyserve.api import sessions
from hueyserve.api.paths import Access, access, is_upload
from hueyserve.errors import PayloadTooLarge, RequestTimeout, ServiceError

CALLER = "caller"  #: request.state.caller: the Access the request's key gives, or None
KEY_ID = "key_id"  #: request.state.key_id: a hash naming the request's API key (keys on)
KEYS_ON = "keys_on"  #: request.state.keys_on: whether keys are configured


def keys_on(state: object) -> bool:
    return bool(getattr(state, KEYS_ON, False))


def is_admin(state: object) -> bool:
    """Whether a request (its `request.state`) may see operational details: an admin key, or
    no keys configured. Without a guard in front (no state), as without keys."""
    return getattr(state, CALLER, Access.ADMIN) is Access.ADMIN


def scoped(state: object, client_key: str | None) -> str | None:
    """An Idempotency-Key as its API key's own (`request.state`), so that two clients that
    choose the same idempotency key never get each other's job."""
    owner = getattr(state, KEY_ID, None)
    return client_key if client_key is None or owner is None else f"{owner}:{client_key}"


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        predict_keys: frozenset[str],
        admin_keys: frozenset[str],
        max_body_bytes: int,
        max_upload_bytes: int = 0,
        body_timeout_s: float = 30.0,
        key_salt: str | None = None,
        allowed_origins: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.predict_keys = predict_keys | admin_keys  # an admin may predict too
        self.admin_keys = admin_keys
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max(max_upload_bytes, max_body_bytes)  #: model imports
        self.body_timeout_s = body_timeout_s
        self.key_salt = (key_salt or "").encode()  #: HUEYSERVE_SECRET, for key ids
        self.allowed_origins = frozenset(origin.lower() for origin in allowed_origins)
        self.by_access = {Access.PREDICT: self.predict_keys, Access.ADMIN: admin_keys}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._socket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        key = key_of(headers) if self.predict_keys else None
        caller = self._caller(key)
        if caller is None and key is None and scope.get("method") == "GET":
            caller = self._session(headers)
        # For routes that show more to an admin, and idempotency keys of one API key's own
        # (an outer guard's word stands).
        state = scope.setdefault("state", {})
        state.setdefault(CALLER, caller)
        state.setdefault(KEYS_ON, bool(self.predict_keys))
        if key is not None and caller is not None and b"idempotency-key" in headers:
            # Only idempotency keys use it, so only they pay for it (not every request).
            # Keyed with the secret: a Redis reader cannot test guesses of an API key.
            key_id = hmac.new(self.key_salt, key.encode("latin-1"), hashlib.sha256)
            state.setdefault(KEY_ID, key_id.hexdigest()[:16])
        method = scope.get("method", "GET")
        limit = self.max_upload_bytes if is_upload(scope["path"], method) else self.max_body_bytes
        refusal = self._refusal(scope["path"], method, headers, caller, limit)
        if refusal is not None:
            status, message, extra = refusal
            if b"content-length" in headers or b"transfer-encoding" in headers:
                # A body nobody reads: close, or its sender could keep the socket forever.
                extra = [*extra, (b"connection", b"close")]
            await _answer(send, status, message, extra)
            return
        started = False
        refused: ServiceError | None = None  # the body was too large or too slow
        size, more_body = 0, True
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def counted() -> Message:
            """`receive`, failing with a 413 once the body passes the limit (for bodies sent
            without a Content-Length, which `_refusal` cannot check up front) and with a 408
            when it has not all come by the deadline."""
            nonlocal size, more_body, refused
            if not more_body:  # the body is in: now only a disconnect can come, any time
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refused = RequestTimeout(self._too_slow())
                raise refused from None
            more_body = message["type"] == "http.request" and message.get("more_body", False)
            size += len(message.get("body", b""))
            if size > limit:
                refused = PayloadTooLarge(self._too_large(size, limit))
                raise refused
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if refused is not None and not started:
                # FastAPI turns any failure to read a body it parses into its own 400: the
                # client must hear why instead.
                started = True
                await _answer(send, *_refusal_of(refused))
                return
            if refused is not None:
                return  # the rest of the app's own answer, already replaced
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched_send)
        except (PayloadTooLarge, RequestTimeout) as exc:  # raised through: nobody answered yet
            if started:
                raise
            await _answer(send, *_refusal_of(exc))

    async def _socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket: its origin and its key (header or session), or a close before it is
        accepted (the client sees a 403)."""
        headers = dict(scope["headers"])
        key = key_of(headers) if self.predict_keys else None
        caller = self._caller(key) if key is not None else self._session(headers)
        refused = not self._same_or_allowed_origin(headers) or (
            self.predict_keys and caller is None
        )
        if refused or access(scope["path"], "GET") is Access.ADMIN and caller is not Access.ADMIN:
            await send({"type": "websocket.close", "code": 1008})
            return
        scope.setdefault("state", {}).setdefault(CALLER, caller)
        await self.app(scope, receive, send)

    def _same_or_allowed_origin(self, headers: dict[bytes, bytes]) -> bool:
        """No Origin (not a browser), this server's own, or one allowed by configuration."""
        origin = headers.get(b"origin")
        if origin is None:
            return True
        text = origin.decode("latin-1").lower()
        host = headers.get(b"host", b"").decode("latin-1").lower()
        return urlsplit(text).netloc == host or text in self.allowed_origins

    def _session(self, headers: dict[bytes, bytes]) -> Access | None:
        """The access a valid session cookie gives (for reads), when keys are configured."""
        token = sessions.cookie_of(headers) if self.predict_keys else None
        return None if token is None else sessions.check(token, self.by_access, self.key_salt)

    def _caller(self, key: str | None) -> Access | None:
        """The access the request's key gives (all of it when no keys are configured)."""
        if not self.predict_keys:
            return Access.ADMIN
        if key is None:
            return None
        if _known(key, self.admin_keys):
            return Access.ADMIN
        return Access.PREDICT if _known(key, self.predict_keys) else None

    def _too_slow(self) -> str:
        return (
            f"the body did not arrive within {self.body_timeout_s:g} s "
            "(HUEYSERVE_BODY_TIMEOUT_S): send it at once"
        )

    def _too_large(self, size: int, limit: int, *, exact: bool = False) -> str:
        amount = f"{size} bytes" if exact else f"{size} bytes or more"
        if limit == self.max_body_bytes:
            setting, advice = "HUEYSERVE_MAX_BODY_BYTES", "send fewer instances per request"
        else:
            setting, advice = "HUEYSERVE_MAX_ARTIFACT_BYTES", "serve the model from a URI"
        return f"the body has {amount}; the limit is {limit} ({setting}): {advice}"

    def _refusal(
        self,
        path: str,
        method: str,
        headers: dict[bytes, bytes],
        caller: Access | None,
        limit: int,
    ) -> tuple[int, str, list[tuple[bytes, bytes]]] | None:
        """(status, message, headers) to answer instead of the app, or None to go on."""
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > limit:
            return 413, self._too_large(int(length), limit, exact=True), []
        needed = access(path, method)
        if not self.predict_keys or needed is Access.OPEN or caller is Access.ADMIN:
            return None
        challenge = [(b"www-authenticate", b'Bearer realm="hueyserve"')]
        if caller is None:
            if key_of(headers) is None:
                return 401, "an API key is required: send 'Authorization: Bearer <key>'", challenge
            return 401, "unknown API key", challenge
        if needed is Access.ADMIN:
            return 403, "this key may predict but not change models: use an admin key", []
        return None


def _refusal_of(exc: ServiceError) -> tuple[int, str, list[tuple[bytes, bytes]]]:
    headers = [(k.lower().encode(), v.encode()) for k, v in exc.headers().items()]
    return exc.status_code, exc.message, headers


async def _answer(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = orjson.dumps({"error": message})
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def key_of(headers: dict[bytes, bytes]) -> str | None:
    authorization = headers.get(b"authorization", b"")
    if authorization[:7].lower() == b"bearer ":
        return authorization[7:].strip().decode("latin-1")
    key = headers.get(b"x-api-key")
    return None if key is None else key.strip().decode("latin-1")


def _known(key: str, keys: frozenset[str]) -> bool:
    """Constant time for each configured key, so timing does not tell how much matched."""
    found = False
    for candidate in keys:
        found |= hmac.compare_digest(key.encode("latin-1"), candidate.encode("latin-1"))
    return found
