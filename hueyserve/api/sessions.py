"""Browser sessions for the pages: a short-lived cookie that stands for an API key.

A browser's EventSource and WebSocket cannot send an `Authorization` header, and a key in a
URL lands in access logs. So the dashboard, holding the key the user typed, asks for a
session (`POST /v1/session` with the key in the header) and gets a cookie: HttpOnly,
SameSite=Strict, valid HUEYSERVE_SESSION_TTL_S. The cookie says which access it gives, until
when, and proves it with an HMAC keyed by the API key itself (and HUEYSERVE_SECRET), so any API
process checks it without shared state, and removing the key from the configuration ends its
sessions.
The guard accepts the cookie for reads only (GET): changes still need the key in a header,
which another site's page cannot make a browser send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from hueyserve.api.paths import Access

COOKIE = "hueyserve_session"
_SIGNED = b"hueyserve session v1|"


def _signature(key: str, claim: str, salt: bytes) -> str:
    # Keyed by the secret too (when set): a stolen cookie is no test bench for guessing the key.
    keyed = salt + b"|" + key.encode("latin-1")
    return hmac.new(keyed, _SIGNED + claim.encode(), hashlib.sha256).hexdigest()


def mint(key: str, access: Access, ttl_s: int, salt: bytes = b"") -> str:
    """A session token for `key`, which gives `access`, valid for `ttl_s` seconds; `salt` is
    HUEYSERVE_SECRET (the guard's `key_salt`)."""
    claim = f"{access.value}.{int(time.time()) + ttl_s}.{secrets.token_hex(8)}"
    return f"{claim}.{_signature(key, claim, salt)}"


def check(token: str, keys: dict[Access, frozenset[str]], salt: bytes = b"") -> Access | None:
    """The access a session token gives: it is unexpired and signed by one of the configured
    keys of the access it claims; else None."""
    claim, _, signature = token.rpartition(".")
    parts = claim.split(".")
    expiry = parts[1] if len(parts) == 3 else ""
    if (
        not (expiry.isascii() and expiry.isdigit() and len(expiry) < 12)
        or int(expiry) < time.time()
    ):
        return None
    try:
        access = Access(parts[0])
    except ValueError:
        return None
    found = False
    for key in keys.get(access, frozenset()):  # every key, so timing tells nothing
        found |= hmac.compare_digest(_signature(key, claim, salt), signature)
    return access if found else None


def cookie_of(headers: dict[bytes, bytes]) -> str | None:
    """The session cookie in a request's headers, if any."""
    for part in headers.get(b"cookie", b"").decode("latin-1").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None
