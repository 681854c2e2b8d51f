"""`make bench`: hueyserve against what users write without a queue, in one run.

Starts an embedded Redis, a `huey_consumer` and hueyserve's uvicorn on free ports, plus the
references of bench/inline_app.py, and drives each with wrk (a C load generator: one
event-loop thread uses a fraction of a core, so on a 2-core machine it leaves the servers the
CPU that a Python client would take). Scenarios: concurrency 1, 8, 64, 256 with distinct
single-row inputs (every request crosses the queue), repeated inputs (cache hits), batching
off and on, and requests of 64 rows at concurrency 8 and 64. Also measured: the model called
in-process at its best batch size (the ceiling). Prints a Markdown table and writes
results.md, results.json and PNG plots into bench/results/.

make bench                                  # or: .venv/bin/python -m bench.run --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx2 as httpx
import numpy as np

from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from hueyserve.dev.stack import PROTOCOL, stop
from hueyserve.worker.fitting import ensure_demo_models
from hueyserve.worker.store import ModelStore

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BIN = Path(sys.executable).parent
LEVELS = (1, 8, 64, 256)
ROWS_LEVELS = (8, 64)  #: concurrency of the 64-row scenario


@dataclass
class Result:
    target: str  #: hueyserve, hueyserve (batching off), inline, constant, in-process
    scenario: str  #: distinct, repeated, 64 rows, ceiling
    concurrency: int
    requests_per_s: float
    rows_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int


def wrk(
    url: str, concurrency: int, seconds: float, *, rows: int = 1, repeat: bool = False
) -> dict[str, float]:
    """One wrk run; its throughput, latency percentiles and errors."""
    env = {**os.environ, "ROWS": str(rows), "REPEAT": "1" if repeat else "0"}
    duration = f"-d{max(1, round(seconds))}s"
    command = [
        "wrk", "-t1", f"-c{concurrency}", duration, "--latency", "--timeout", "30s",
        "-s", str(ROOT / "bench" / "predict.lua"), url,
    ]  # fmt: skip
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    errors += sum(int(n) for n in sockets.groups()) if sockets else 0
    return {
        "rate": rate,
        "p50": _ms(re.search(r"50%\s+([\d.]+)(us|ms|s)", out)),
        "p99": _ms(re.search(r"99%\s+([\d.]+)(us|ms|s)", out)),
        "errors": errors,
    }


def _ms(match: re.Match[str] | None) -> float:
    assert match is not None
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def wait_ready(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} never became ready")


@contextmanager
def hueyserve(env: dict[str, str], batching: bool) -> Iterator[str]:
    """Redis is shared; a consumer and the API are started per configuration."""
    env = {**env, "HUEYSERVE_BATCH_MAX_ROWS": "1024" if batching else "1"}
    port = free_port()
    consumer = spawn([str(BIN / "huey_consumer"), "core.huey", "-k", "thread", "-w", "16"], env)
    api = spawn(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), "--no-access-log",
         "--log-level", "warning", "--http", PROTOCOL],
        env,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/v2/health/ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(api)
        stop(consumer)


@contextmanager
def inline(env: dict[str, str], workers: int) -> Iterator[str]:
    port = free_port()
    server = spawn(
        [sys.executable, "-m", "uvicorn", "bench.inline_app:app", "--port", str(port),
         "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        env,
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}/docs")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(server)


def ceiling(store: ModelStore) -> Result:
    """The model in-process: rows/s at its best batch size."""
    model = store.load("diabetes", "1")
    rng = np.random.default_rng(0)
    best = (0.0, 1)
    for size in (1, 8, 64, 256, 1024):
        rows = rng.normal(scale=0.05, size=(size, 10))
        model.predict(rows)
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < 1.0:
            model.predict(rows)
            calls += 1
        rate = calls * size / (time.perf_counter() - started)
        best = max(best, (rate, size))
    return Result(
        "in-process", f"ceiling (batch {best[1]})", 1, best[0] / best[1], best[0], None, None, 0
    )


def run(seconds: float) -> list[Result]:
    results: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="hueyserve-bench-"))
    store = ModelStore(workdir / "models")
    ensure_demo_models(store, workdir)
    redis = EmbeddedRedis(port=free_port())
    redis.start()
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "HUEYSERVE_MODEL_DIR": str(store.root),
        "HUEYSERVE_LOG_DIR": str(workdir / "logs"),
    }

    def record(
        target: str, scenario: str, url: str, level: int, rows: int = 1, repeat: bool = False
    ) -> None:
        wrk(url, level, 2, rows=rows, repeat=repeat)  # warm up: models loaded, caches primed
        m = wrk(url, level, seconds, rows=rows, repeat=repeat)
        result = Result(
            target,
            scenario,
            level,
            m["rate"],
            m["rate"] * rows,
            m["p50"],
            m["p99"],
            int(m["errors"]),
        )
        print(
            f"  {target:28} {scenario:9} c={level:<4} {result.requests_per_s:8.0f} req/s  "
            f"p50 {result.p50_ms:8.2f} ms  p99 {result.p99_ms:8.2f} ms  errors {result.errors}",
            flush=True,
        )
        results.append(result)

    try:
        results.append(ceiling(store))
        with inline(env, workers=2) as url:
            for level in LEVELS:
                record("inline (uvicorn --workers 2)", "distinct", f"{url}/predict", level)
            for level in ROWS_LEVELS:
                record("inline (uvicorn --workers 2)", "64 rows", f"{url}/predict", level, rows=64)
        with inline(env, workers=1) as url:
            for level in (1, 64, 256):
                record("constant (1 process)", "repeated", f"{url}/constant", level, repeat=True)
        for batching in (True, False):
            name = "hueyserve" if batching else "hueyserve (batching off)"
            with hueyserve(env, batching) as url:
                predict = f"{url}/v1/models/diabetes:predict"
                for level in LEVELS:
                    record(name, "distinct", predict, level)
                if batching:
                    for level in LEVELS:
                        record(name, "repeated", predict, level, repeat=True)
                    for level in ROWS_LEVELS:
                        record(name, "64 rows", predict, level, rows=64)
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def table(results: list[Result]) -> str:
    lines = [
        "| target | inputs | concurrency | req/s | rows/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        p50 = "" if r.p50_ms is None else f"{r.p50_ms:.2f}"
        p99 = "" if r.p99_ms is None else f"{r.p99_ms:.2f}"
        lines.append(
            f"| {r.target} | {r.scenario} | {r.concurrency} | {r.requests_per_s:,.0f} | "
            f"{r.rows_per_s:,.0f} | {p50} | {p99} | {r.errors} |"
        )
    return "\n".join(lines)


def targets(results: list[Result]) -> str:
    """The issue's targets as ratios within this run."""

    def find(target: str, scenario: str, level: int) -> Result:
        return next(
            r
            for r in results
            if r.target.startswith(target)
            and r.scenario.startswith(scenario)
            and r.concurrency == level
        )

    inline1, ours1 = find("inline", "distinct", 1), find("hueyserve", "distinct", 1)
    inline64, ours64 = find("inline", "distinct", 64), find("hueyserve", "distinct", 64)
    ceiling_ = next(r for r in results if r.target == "in-process")
    rows64 = {level: find("hueyserve", "64 rows", level) for level in ROWS_LEVELS}
    best_rows = max(r.rows_per_s for r in rows64.values())
    constant, hits = find("constant", "repeated", 64), find("hueyserve", "repeated", 64)
    errors = sum(r.errors for r in results)
    checks = [
        ("c=1 p50 within 2 ms of inline", f"{ours1.p50_ms:.2f} vs {inline1.p50_ms:.2f} ms",
         (ours1.p50_ms or 0) - (inline1.p50_ms or 0) <= 2),
        ("c=64 distinct: throughput ≥ 3.6× inline",
         f"{ours64.requests_per_s / inline64.requests_per_s:.2f}×",
         ours64.requests_per_s >= 3.6 * inline64.requests_per_s),
        ("c=64 distinct: p99 ≤ inline's", f"{ours64.p99_ms:.1f} vs {inline64.p99_ms:.1f} ms",
         (ours64.p99_ms or 0) <= (inline64.p99_ms or 0)),
        ("64-row requests: rows/s ≥ 60% of the in-process ceiling",
         ", ".join(f"c={c}: {r.rows_per_s / ceiling_.rows_per_s:.0%}" for c, r in rows64.items()),
         best_rows >= 0.6 * ceiling_.rows_per_s),
        ("cache hits: ≥ 80% of a constant endpoint",
         f"{hits.requests_per_s / constant.requests_per_s:.0%}",
         hits.requests_per_s >= 0.8 * constant.requests_per_s),
        ("0 errors at every level", str(errors), errors == 0),
    ]  # fmt: skip
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {'yes' if ok else '**no**'} |" for name, value, ok in checks]
    return "\n".join(lines)


def plot(results: list[Result]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for target, scenario in [
        ("inline (uvicorn --workers 2)", "distinct"),
        ("hueyserve (batching off)", "distinct"),
        ("hueyserve", "distinct"),
        ("hueyserve", "repeated"),
    ]:
        points = [r for r in results if r.target == target and r.scenario == scenario]
        levels = [r.concurrency for r in points]
        label = f"{target}, {scenario}"
        left.plot(levels, [r.requests_per_s for r in points], marker="o", label=label)
        right.plot(levels, [r.p99_ms for r in points], marker="o", label=label)
    for axis, title in ((left, "throughput (req/s)"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("concurrent clients")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput_latency.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="length of each wrk run")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("make bench needs wrk: apt install wrk (Debian/Ubuntu) or brew install wrk")
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = run(args.seconds)
    report = f"## Results\n\n{table(results)}\n\n## Targets\n\n{targets(results)}\n"
    print("\n" + report)
    (RESULTS / "results.md").write_text(report)
    (RESULTS / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot(results)
    print(f"wrote {RESULTS}/results.md, results.json, throughput_latency.png")


if __name__ == "__main__":
    main()
