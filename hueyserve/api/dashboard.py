"""The dashboard: its page (GET /, one static file, no build step, nothing from a CDN) and what
it reads besides the event stream (GET /v1/stats): the recent activity, queue depth by
priority, workers and models.

The page (hueyserve/api/static/dashboard.html) draws with inline SVG and plain JavaScript;
it follows GET /v1/events for live changes and reads the aggregates every few seconds.
"""

from __future__ import annotations

import contextlib
import time
from functools import cache
from pathlib import Path
from typing import Any

from hueyserve.api.services import Services
from hueyserve.errors import ServiceError

PAGE = Path(__file__).with_name("static") / "dashboard.html"


@cache
def page() -> bytes:
    return PAGE.read_bytes()


async def stats(api: Services, *, admin: bool) -> dict[str, Any]:
    """Everything the dashboard shows but the live events. Workers' hosts are for operators
    (as on /health): without an admin key (keys on), only how many there are."""
    summary: dict[str, Any] = {"at": time.time(), **api.activity.summary()}
    summary["models"] = models(api)
    summary["event_clients"] = api.streams.open_streams
    summary["redis"] = {"ok": True}
    try:
        summary["queue_depth"] = {
            str(p): n for p, n in (await api.health.depth_by_priority()).items()
        }
        workers = await api.health.worker_details()
        summary["workers"] = workers if admin else [{"worker": "hidden"} for _ in workers]
        with contextlib.suppress(ServiceError):
            summary["event_stream"] = await api.health.redis.event_stream()
    except ServiceError as exc:  # Redis down: the page says so and keeps what it had
        summary["redis"] = {"ok": False, "error": exc.message}
    return summary


def models(api: Services) -> list[dict[str, Any]]:
    """Each model: versions (runtime, metrics), which is active, and whether it is pinned."""
    found = []
    for name, entry in sorted(api.catalog.models.items()):
        versions = [
            {
                "version": version,
                "runtime": metadata.get("runtime", "sklearn"),
                "metrics": metadata.get("metrics", {}),
                "created": metadata.get("created"),
            }
            for version, metadata in sorted(entry.versions.items(), key=lambda v: (len(v[0]), v[0]))
        ]
        found.append(
            {"name": name, "active": entry.active, "pinned": entry.pinned, "versions": versions}
        )
    return found
