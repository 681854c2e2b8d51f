"""Request-validation failures as one clear ServiceError.

FastAPI's default answer echoes the offending input (which even fails to render for NaN) and
speaks pydantic; ours names the field and says what to send instead, echoing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from hueyserve.errors import BadRequest, InvalidInput, ServiceError, UnsupportedMediaType

Body = TypeVar("Body", bound=BaseModel)

MAX_LISTED = 5
BODY_EXAMPLE = '{"instances": [[...], ...]}'
HINTS = {
    "finite_number": " (NaN and Infinity are not allowed)",
    "float_type": " (a JSON number such as 0.25; strings, booleans and null are refused)",
}


def validation_failure(problems: Sequence[Any], content_type: str | None) -> ServiceError:
    """The error to answer for FastAPI's RequestValidationError.errors()."""
    for problem in problems:
        if problem.get("type") == "json_invalid":
            detail = problem.get("ctx", {}).get("error", "invalid JSON")
            return BadRequest(f"malformed JSON body: {detail}")
    if any(tuple(p.get("loc", ())) == ("body",) for p in problems):
        check_json_media(content_type)
        return InvalidInput(f"the body must be a JSON object such as {BODY_EXAMPLE}")
    messages = [
        f"{location(p['loc']) or 'body'}: {p['msg']}{HINTS.get(p.get('type'), '')}"
        for p in problems[:MAX_LISTED]
    ]
    more = len(problems) - MAX_LISTED
    return InvalidInput("; ".join(messages) + (f" (and {more} more)" if more > 0 else ""))


def check_json_media(content_type: str | None) -> None:
    """A 415 unless the body is declared as JSON (or not declared at all)."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media and not (media == "application/json" or media.endswith("+json")):
        raise UnsupportedMediaType(
            f"the body must be JSON sent with 'Content-Type: application/json', not {media!r}"
        )


def parse_json_body(
    schema: type[Body], raw: bytes, content_type: str | None, *, takes: str | None = None
) -> Body:
    """A JSON body as `schema`, parsed by pydantic-core straight from the bytes (faster than
    json.loads and then validation), or the same 4xx as for a body FastAPI parsed; `takes`
    (what the model takes) starts a 422's message."""
    check_json_media(content_type)
    if not raw.strip():
        raise InvalidInput(f"the body must be a JSON object such as {BODY_EXAMPLE}")
    try:
        return schema.model_validate_json(raw)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        located = [{**p, "loc": ("body", *p["loc"])} for p in problems]
        failure = validation_failure(located, content_type)
        if takes and isinstance(failure, InvalidInput):
            failure = InvalidInput(f"{takes}; {failure.message}")
        raise failure from None


def location(loc: Sequence[int | str]) -> str:
    """("body", "instances", 0, 9) -> "instances[0][9]"."""
    parts = loc[1:] if loc and loc[0] == "body" else loc
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
