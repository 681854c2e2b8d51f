"""The last minutes of the whole deployment, for the dashboard (GET /v1/stats): throughput,
queue-wait and run-time percentiles, error and retry rates, recent jobs.

Built in each API process from the event stream it reads anyway (hueyserve.api.events), so
every process tells the same story without asking the others, and one started a minute ago
reads the stream back for the minutes before it. Prometheus has the same latencies as
histograms (`hueyserve_job_queue_seconds`, `hueyserve_job_run_seconds`), from the workers;
this is for people without Grafana.
"""

from __future__ import annotations

import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hueyserve.api.events import Event

WINDOW_S = 300  #: what "the last minutes" means
BUCKET_S = 5  #: the resolution of the series
SAMPLES_PER_BUCKET = 500  #: latencies kept per bucket (a uniform sample past that)
RECENT_JOBS = 50  #: jobs listed, newest first
COUNTED = ("queued", "done", "failed", "retrying", "requeued", "cancelled", "expired")


@dataclass
class Bucket:
    start: int
    counts: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)
    runs: list[float] = field(default_factory=list)
    ended: int = 0  #: jobs whose latencies were offered (for the sample's odds)

    def sample(self, wait: float, run: float) -> None:
        """Reservoir sampling: every ended job is equally likely to be kept."""
        self.ended += 1
        if len(self.waits) < SAMPLES_PER_BUCKET:
            self.waits.append(wait)
            self.runs.append(run)
            return
        slot = random.randrange(self.ended)
        if slot < SAMPLES_PER_BUCKET:
            self.waits[slot], self.runs[slot] = wait, run


class Activity:
    """Listens to the feed (`observe`) and summarises the window (`summary`)."""

    def __init__(self) -> None:
        self.buckets: OrderedDict[int, Bucket] = OrderedDict()
        self.recent: OrderedDict[str, dict[str, Any]] = OrderedDict()

    def observe(self, event: Event) -> None:
        fields = event.fields
        if event.type != "job" or event.job is None:
            return
        at = int(event.id.partition("-")[0]) / 1000  # the stream id is the write's time
        bucket = self._bucket(at)
        name = fields.get("event", "")
        if name in COUNTED:
            bucket.counts[name] += 1
        if name in ("done", "failed") and "queued_s" in fields and "run_s" in fields:
            bucket.sample(float(fields["queued_s"]), float(fields["run_s"]))
        self._remember(event.job, fields, at)

    def _bucket(self, at: float) -> Bucket:
        start = int(at // BUCKET_S * BUCKET_S)
        bucket = self.buckets.get(start)
        if bucket is None:
            bucket = self.buckets[start] = Bucket(start)
            if len(self.buckets) > 1 and start < next(reversed(self.buckets)):
                self.buckets = OrderedDict(sorted(self.buckets.items()))  # a late event
        oldest = time.time() - WINDOW_S - BUCKET_S
        while self.buckets and next(iter(self.buckets)) < oldest:
            self.buckets.popitem(last=False)
        return bucket

    def _remember(self, job: str, fields: dict[str, str], at: float) -> None:
        known = self.recent.pop(job, None) or {"job_id": job, "created": at}
        known.update(
            {k: fields[k] for k in ("kind", "model", "version", "status", "stage", "error")
             if k in fields},
            updated=at,
        )  # fmt: skip
        for key in ("queued_s", "run_s", "progress"):
            if key in fields:
                known[key] = float(fields[key])
        self.recent[job] = known
        while len(self.recent) > RECENT_JOBS:
            self.recent.popitem(last=False)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        since = now - WINDOW_S
        window = [b for start, b in self.buckets.items() if start >= since - BUCKET_S]
        counts: Counter[str] = sum((b.counts for b in window), Counter())
        ended = counts["done"] + counts["failed"]
        waits = np.array([w for b in window for w in b.waits])
        runs = np.array([r for b in window for r in b.runs])
        return {
            "window_s": WINDOW_S,
            "counts": {name: counts[name] for name in COUNTED},
            "throughput_per_s": round(counts["done"] / WINDOW_S, 3),
            "error_rate": round(counts["failed"] / ended, 4) if ended else 0.0,
            "retry_rate": round((counts["retrying"] + counts["requeued"]) / ended, 4)
            if ended
            else 0.0,
            "latency_s": {"queue_wait": _percentiles(waits), "run": _percentiles(runs)},
            "series": [
                {
                    "t": b.start,
                    "done": b.counts["done"],
                    "failed": b.counts["failed"],
                    "queued": b.counts["queued"],
                }
                for b in window
            ],  # fmt: skip
            "recent_jobs": list(reversed(self.recent.values())),
        }


def _percentiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"p50": None, "p95": None, "p99": None, "samples": 0}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 6),
        "p95": round(float(p95), 6),
        "p99": round(float(p99), 6),
        "samples": len(values),
    }
