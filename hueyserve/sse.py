"""Reading server-sent events (text/event-stream) as a client: the command line follows a
job with it. The parsing rules are the HTML standard's (an event ends at a blank line; `id`
persists; comments and unknown fields are ignored), kept small because the only client
libraries for it are tied to another HTTP client than ours."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class ServerEvent:
    event: str = "message"
    data: str = ""
    id: str | None = None  #: the last event id as of this event (what a reconnect sends)
    retry_ms: int | None = None
    comments: list[str] = field(default_factory=list)


def events(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """The events of a stream given line by line (without line ends). Yields an event for
    each dispatch, and one with empty `data` for a block that only sets `id` or `retry`."""
    last_id: str | None = None
    current = ServerEvent()
    data: list[str] = []
    touched = False
    for line in lines:
        if line == "":
            if touched:
                current.data, current.id = "\n".join(data), last_id
                yield current
            current, data, touched = ServerEvent(), [], False
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            current.comments.append(value)
            continue
        touched = True
        if name == "data":
            data.append(value)
        elif name == "event":
            current.event = value
        elif name == "id" and "\0" not in value:
            last_id = value
        elif name == "retry" and value.isdigit():
            current.retry_ms = int(value)
