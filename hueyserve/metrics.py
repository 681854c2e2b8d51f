"""Prometheus metrics of the API and the workers, served at `GET /metrics`.

API processes and consumer processes are separate, so with `PROMETHEUS_MULTIPROC_DIR` set
(`make run` sets it) every process writes its metrics to files there and `/metrics` adds them
all up: task run times and batch sizes come from the workers on the same host. Without it,
`/metrics` shows the answering process only (workers in the same process included, as in
the tests).
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUEST_SECONDS = Histogram(
    "hueyserve_request_seconds",
    "HTTP request latency by route template, method and status.",
    ["route", "method", "status"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DEPTH = Gauge(
    "hueyserve_queue_depth",
    "Tasks waiting in the queue, by priority (read from Redis at scrape time).",
    ["priority"],
    multiprocess_mode="mostrecent",
)
TASK_SECONDS = Histogram(
    "hueyserve_task_seconds",
    "Run time of Huey tasks in the workers, by task and outcome.",
    ["task", "outcome"],
    buckets=LATENCY_BUCKETS,
)
JOB_QUEUE_SECONDS = Histogram(
    "hueyserve_job_queue_seconds",
    "How long jobs waited from their submission to their (latest) start, by kind (workers).",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
JOB_RUN_SECONDS = Histogram(
    "hueyserve_job_run_seconds",
    "How long jobs ran in a worker, start to end (a group's jobs share their task's), by kind.",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
TASKS_RUNNING = Gauge(
    "hueyserve_tasks_running",
    "Tasks running now in the workers.",
    ["task"],
    multiprocess_mode="livesum",
)
BATCH_ROWS = Histogram(
    "hueyserve_batch_rows",
    "Rows per model predict call in the workers (dynamic batching).",
    ["model"],
    buckets=ROW_BUCKETS,
)
BATCH_TASKS = Histogram(
    "hueyserve_batch_tasks",
    "Tasks served per model predict call in the workers.",
    ["model"],
    buckets=ROW_BUCKETS,
)
CACHE_LOOKUPS = Counter(
    "hueyserve_cache_lookups_total",
    "Prediction cache lookups by where (api, worker) and result (hit, miss).",
    ["where", "result"],
)
PROCESS_RESTARTS = Counter(
    "hueyserve_process_restarts_total",
    "Processes `make run` started again after they exited on their own, by process.",
    ["process"],
)
JOBS = Counter(
    "hueyserve_jobs_total",
    "Jobs by kind and what happened: submitted and cancelled (API); done, failed and "
    "expired (workers).",
    ["kind", "status"],
)


def observe_batch(model: str, version: str, rows: int, tasks: int, seconds: float) -> None:
    BATCH_ROWS.labels(model).observe(rows)
    BATCH_TASKS.labels(model).observe(tasks)


def render() -> tuple[bytes, str]:
    """The exposition text of every process sharing the multiprocess folder, or of this one."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
