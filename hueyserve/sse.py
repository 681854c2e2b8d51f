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


class Parser:
    """Fed line by line (without line ends); `feed` answers each event as its block ends,
    with empty `data` for a block that only sets `id` or `retry`."""

    def __init__(self) -> None:
        self.last_id: str | None = None
        self._current = ServerEvent()
        self._data: list[str] = []
        self._touched = False

    def feed(self, line: str) -> ServerEvent | None:
        if line == "":
            done = None
            if self._touched:
                done = self._current
                done.data, done.id = "\n".join(self._data), self.last_id
            self._current, self._data, self._touched = ServerEvent(), [], False
            return done
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            self._current.comments.append(value)
            return None
        self._touched = True
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._current.event = value
        elif name == "id" and "\0" not in value:
            self.last_id = value
        elif name == "retry" and value.isdigit():
            self._current.retry_ms = int(value)
        return None


def events(lines: Iterable[str]) -> Iterator[ServerEvent]:
    """The events of a stream given line by line."""
    parser = Parser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
