"""What goes through Redis, as JSON: task messages, results, revoke flags. Never pickle.

Huey pickles by default, so anyone who can write to Redis runs code in every process that
reads what they wrote. This serializer writes JSON (orjson) and reads back only the types
Huey and hueyserve put there: tuples, datetimes, numpy arrays of numbers or text, Huey's
`Message` and `Error`, a `TrainPlan`. Anything else fails to decode (the consumer logs and
drops such a message; the API reports such a result as unreadable), and nothing read is ever
executed.

With HUEYSERVE_SECRET every payload is signed (HMAC-SHA256): a forged or altered message or
result fails its check. A result is stored with the id of the job it belongs to, inside what
is signed, so a result copied onto another job is refused too (`dump_result`, `load_result`).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import math
from dataclasses import asdict, fields
from typing import Any

import numpy as np
import orjson
from huey.registry import Message
from huey.serializer import Serializer
from huey.utils import Error

from hueyserve.training import TrainPlan

TAG = "$t"  #: marks an encoded value that JSON has no type for: {TAG: kind, "v": ...}
#: numpy dtypes a message may hold: numbers and fixed-width text (a text model's rows), no objects
ARRAY_KINDS = frozenset("biufcU")
INT64 = range(-(2**63), 2**63)  # orjson's integers; larger ones travel as text
SIGNED = b"hs1:"  #: prefix of a signed payload: SIGNED + hex HMAC + ":" + JSON
_PLAN_FIELDS = frozenset(field.name for field in fields(TrainPlan))


class UnreadablePayload(ValueError):
    """Not something hueyserve wrote: bad JSON, an unknown type, or a failed signature."""


class JsonSerializer(Serializer):  # type: ignore[misc]
    """Huey's serializer interface over JSON, signed when a secret is given."""

    def __init__(self, secret: str | None = None) -> None:
        super().__init__()
        self._key = None if secret is None else _derive_key(secret)

    # Huey calls these two through serialize() and deserialize().
    def _serialize(self, data: Any) -> bytes:
        body = orjson.dumps(encode(data))
        if self._key is None:
            return body
        return SIGNED + self._sign(body) + b":" + body

    def _deserialize(self, data: bytes | str) -> Any:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if self._key is not None:
            raw = self._unsign(raw)
        try:
            return decode(orjson.loads(raw))
        except (orjson.JSONDecodeError, TypeError, KeyError, IndexError, ValueError) as exc:
            raise UnreadablePayload(f"not a hueyserve payload: {exc}") from exc

    def dump_result(self, job_id: str, value: Any) -> bytes:
        """A job's result (a value or an Error), bound to the job's id."""
        payload: bytes = self.serialize({"job": job_id, "result": value})
        return payload

    def load_result(self, job_id: str, raw: bytes | str) -> Any:
        """The result stored for `job_id`; UnreadablePayload if it was written for another."""
        stored = self.deserialize(raw)
        if not isinstance(stored, dict) or stored.get("job") != job_id or "result" not in stored:
            raise UnreadablePayload(f"the stored result is not job {job_id}'s")
        return stored["result"]

    def _sign(self, body: bytes) -> bytes:
        assert self._key is not None
        return hmac.new(self._key, body, hashlib.sha256).hexdigest().encode()

    def _unsign(self, raw: bytes) -> bytes:
        if not raw.startswith(SIGNED):
            raise UnreadablePayload("the payload is not signed (HUEYSERVE_SECRET is set here)")
        signature, sep, body = raw[len(SIGNED) :].partition(b":")
        if not sep or not hmac.compare_digest(signature, self._sign(body)):
            raise UnreadablePayload("the payload fails its signature check")
        return body


def _derive_key(secret: str) -> bytes:
    # One key per purpose: the heartbeat's proof (hueyserve.wire) uses the secret differently.
    return hmac.new(secret.encode(), b"hueyserve payload signing v1", hashlib.sha256).digest()


def encode(value: Any) -> Any:
    """`value` as plain JSON data, with the types JSON lacks tagged."""
    kind = type(value)  # exact types first: the common case, and cheaper than isinstance
    if kind is str or kind is bool or value is None:
        return value
    if kind is float:  # JSON has no NaN or Infinity (orjson would write null)
        return value if math.isfinite(value) else {TAG: "float", "v": repr(value)}
    if kind is int:
        return value if value in INT64 else {TAG: "int", "v": str(value)}
    if kind is list:
        return [encode(item) for item in value]
    if isinstance(value, np.generic):  # before float: orjson refuses float subclasses
        return encode(value.item())
    # Subclasses (an enum member) travel as their plain value.
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return encode(int(value))
    if isinstance(value, float):
        return encode(float(value))
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, dict):
        if TAG in value or not all(type(key) is str for key in value):
            return {TAG: "map", "v": [[encode(k), encode(v)] for k, v in value.items()]}
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, Message):
        return {TAG: "message", "v": [encode(item) for item in value]}
    if isinstance(value, Error):
        return {TAG: "error", "v": encode(value.metadata)}
    if isinstance(value, tuple):
        return {TAG: "tuple", "v": [encode(item) for item in value]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"only arrays of numbers or text travel, not {value.dtype}")
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode()
        return {TAG: "array", "v": [value.dtype.str, list(value.shape), data]}
    if isinstance(value, datetime.datetime):
        return {TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, datetime.timedelta):
        return {TAG: "timedelta", "v": value.total_seconds()}
    if isinstance(value, TrainPlan):
        return {TAG: "plan", "v": encode(asdict(value))}
    raise TypeError(f"{type(value).__name__} cannot travel through Redis")


def decode(value: Any) -> Any:
    """The inverse of `encode`; an unknown tag or a malformed value raises."""
    kind = type(value)
    if kind is list:
        return [decode(item) for item in value]
    if kind is not dict:
        return value
    if TAG not in value:
        return {key: decode(item) for key, item in value.items()}
    kind, data = value[TAG], value["v"]
    if kind == "tuple":
        return tuple(decode(item) for item in _list(data))
    if kind == "message":
        items = _list(data)
        if not 0 < len(items) <= len(Message._fields):
            raise ValueError("a task message has the wrong number of fields")
        return Message(*(decode(item) for item in items))
    if kind == "error":
        return Error(_dict(decode(data)))
    if kind == "array":
        return _array(*_list(data))
    if kind == "map":
        return {decode(k): decode(v) for k, v in _list(data)}
    if kind == "int":
        return int(str(data))
    if kind == "float":
        return float(str(data))  # nan, inf, -inf
    if kind == "datetime":
        return datetime.datetime.fromisoformat(str(data))
    if kind == "timedelta":
        return datetime.timedelta(seconds=float(data))
    if kind == "plan":
        plan = _dict(decode(data))
        if not set(plan) <= _PLAN_FIELDS:
            raise ValueError(
                f"a training plan has unknown fields: {sorted(set(plan) - _PLAN_FIELDS)}"
            )
        return TrainPlan(**plan)
    raise ValueError(f"unknown type {kind!r}")


def _array(dtype: str, shape: list[int], data: str) -> np.ndarray:
    kind = np.dtype(str(dtype))
    if kind.kind not in ARRAY_KINDS:
        raise ValueError(f"only arrays of numbers or text are read from Redis, not {kind}")
    # A bytearray, so the array is writable as an unpickled one was.
    raw = bytearray(base64.b64decode(str(data), validate=True))
    return np.frombuffer(raw, dtype=kind).reshape([int(n) for n in shape])


def _list(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping")
    return value
