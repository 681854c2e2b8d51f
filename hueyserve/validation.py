"""Request-validation failures as one clear ServiceError.

FastAPI's default answer echoes the offending input (which even fails to render for NaN) and
speaks pydantic; ours names the field and says what to send instead, echoing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hueyserve.errors import BadRequest, InvalidInput, ServiceError, UnsupportedMediaType

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
        media = (content_type or "").split(";")[0].strip().lower()
        if media and not (media == "application/json" or media.endswith("+json")):
            return UnsupportedMediaType(
                f"the body must be JSON sent with 'Content-Type: application/json', not {media!r}"
            )
        return InvalidInput(f"the body must be a JSON object such as {BODY_EXAMPLE}")
    messages = [
        f"{location(p['loc']) or 'body'}: {p['msg']}{HINTS.get(p.get('type'), '')}"
        for p in problems[:MAX_LISTED]
    ]
    more = len(problems) - MAX_LISTED
    return InvalidInput("; ".join(messages) + (f" (and {more} more)" if more > 0 else ""))


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
