"""Following a job from the command line: its server-sent events, drawn as a progress bar
(rich) with a line per stage, until it ends; reconnecting as a browser would (with the last
event id) when the stream ends early or the API restarts."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import orjson
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from hueyserve import sse

RECONNECT_S = 1.0  #: when the server said nothing (its `retry:` says otherwise)


class FollowError(RuntimeError):
    """The job cannot be followed (unknown, refused); the message says why."""


def follow(client: httpx.Client, job_id: str, *, timeout_s: float, quiet: bool = False) -> Any:
    """The job's final state (as GET /v1/jobs/{id} gives it) once it ends, showing its
    progress on stderr meanwhile (not with `quiet`)."""
    console = Console(stderr=True, quiet=quiet)
    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(), console=console, transient=True,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    last_id: str | None = None
    reached = False  # the API answered once
    with bar:
        task = bar.add_task(f"job {job_id[:8]}", total=None, status="")
        stage = None
        while time.monotonic() < deadline:
            pause, data = RECONNECT_S, None
            headers = {"Last-Event-ID": last_id} if last_id else {}
            url = f"/v1/jobs/{job_id}/events"
            try:
                with client.stream("GET", url, headers=headers, timeout=_timeout(deadline)) as r:
                    reached = True
                    if r.status_code == 204:  # ended, and we saw the end: read it whole
                        return client.get(f"/v1/jobs/{job_id}").json()
                    if r.status_code != 200:
                        r.read()
                        raise FollowError(f"{r.status_code}: {_error(r)}")
                    for event in sse.events(r.iter_lines()):
                        last_id = event.id or last_id
                        pause = event.retry_ms / 1000 if event.retry_ms else pause
                        if not event.data:
                            continue
                        data = orjson.loads(event.data)
                        if data.get("stage") and data["stage"] != stage:
                            stage = data["stage"]
                            console.print(f"{data['kind']} {job_id[:8]}: {stage}")
                        fraction = data.get("progress")
                        bar.update(
                            task, status=data.get("status", ""), description=_describe(data),
                            total=1.0 if fraction is not None else None,
                            completed=fraction or 0.0,
                        )  # fmt: skip
                        if data.get("final"):
                            console.print(f"{data['kind']} {job_id[:8]}: {data['status']}")
                            return client.get(f"/v1/jobs/{job_id}").json()
            except httpx.TransportError as exc:
                if not reached:  # never answered: a wrong address, not a restart
                    raise FollowError(f"cannot reach {client.base_url}: {exc}") from exc
                # the API went away (a restart): come back with the last id
            time.sleep(pause)
    raise FollowError(f"job {job_id} did not end within {timeout_s:g}s (it goes on)")


def _describe(data: dict[str, Any]) -> str:
    stage = data.get("stage")
    return f"{data.get('kind', 'job')} {data.get('model_name', '')}" + (
        f": {stage}" if stage else ""
    )


def _timeout(deadline: float) -> httpx.Timeout:
    """Reads wait for keep-alives (15 s apart by default), not longer than the deadline."""
    return httpx.Timeout(10.0, read=max(1.0, min(60.0, deadline - time.monotonic())))


def _error(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text
