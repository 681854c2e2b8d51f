"""The same forest on the sklearn (skops) and onnx runtimes: predict latency in-process and
served through hueyserve.

A RandomForestRegressor (100 trees, load_diabetes, random_state=0) is saved with skops and
converted with skl2onnx (float32 input), and each copy is loaded through `load_runtime`, as a
worker loads it. Timed: `predict` of 1 row and of 64 rows, after a warm-up, many repeats each.
Also reported: the largest difference between the two runtimes' answers (onnx runs the trees
in float32, sklearn in float64). Then both copies are imported into a real stack (embedded
Redis, one `huey_consumer`, uvicorn) and wrk sends sync KServe v1 requests of 1 and of 64
distinct rows, one at a time (c=1: the latency of a lone request) and at c=8. Prints Markdown
tables and writes bench/results/runtimes.md.

.venv/bin/python -m bench.runtimes              # or: ... --repeats 2000
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import numpy as np
import skops.io
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes
from sklearn.ensemble import RandomForestRegressor

from bench.run import hueyserve, wrk
from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from hueyserve.worker.runtimes import load_runtime
from hueyserve.worker.runtimes.base import Runtime

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ROWS = (1, 64)
WARMUP = 50


def build(root: Path) -> dict[str, Runtime]:
    """The forest saved both ways and loaded by its runtime."""
    x, y = load_diabetes(return_X_y=True)
    forest = RandomForestRegressor(n_estimators=100, random_state=0).fit(x, y)
    runtimes = {}
    for name, artifact in (("sklearn", "model.skops"), ("onnx", "model.onnx")):
        folder = root / name
        folder.mkdir()
        if name == "sklearn":
            skops.io.dump(forest, folder / artifact)
        else:
            onnx_model = to_onnx(forest, x[:1].astype(np.float32))
            (folder / artifact).write_bytes(onnx_model.SerializeToString())
        runtimes[name], _ = load_runtime(folder, {"runtime": name}, {})
    return runtimes


def latencies_us(runtime: Runtime, batch: np.ndarray, repeats: int) -> list[float]:
    for _ in range(WARMUP):
        runtime.predict(batch)
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        runtime.predict(batch)
        timings.append((time.perf_counter() - start) * 1e6)
    return timings


def max_difference(runtimes: dict[str, Runtime], x: np.ndarray) -> float:
    """Largest |sklearn - onnx| over the whole data set."""
    answers = [np.ravel(next(iter(runtimes[name].predict(x).values()))) for name in runtimes]
    return float(np.max(np.abs(answers[0] - answers[1])))


def report(runtimes: dict[str, Runtime], repeats: int) -> str:
    x, _ = load_diabetes(return_X_y=True)
    lines = [
        "| rows | runtime | median µs | p90 µs | onnx / sklearn (median) |",
        "|---|---|---|---|---|",
    ]
    for rows in ROWS:
        batch = x[:rows]
        medians = {}
        for name, runtime in runtimes.items():
            timings = latencies_us(runtime, batch, repeats)
            medians[name] = statistics.median(timings)
            p90 = statistics.quantiles(timings, n=10)[-1]
            ratio = f"{medians['onnx'] / medians['sklearn']:.3f}" if name == "onnx" else ""
            lines.append(f"| {rows} | {name} | {medians[name]:.0f} | {p90:.0f} | {ratio} |")
    difference = max_difference(runtimes, x)
    lines.append(
        f"\nMax |sklearn - onnx| over the {len(x)} rows of load_diabetes: {difference:.3g} "
        "(onnx: float32 trees; sklearn: float64)."
    )
    return "\n".join(lines) + "\n"


def served(root: Path, seconds: float) -> str:
    """Both copies imported into a running stack, then sync v1 requests through it."""
    redis = EmbeddedRedis(port=free_port())
    redis.start()
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "HUEYSERVE_MODEL_DIR": str(root / "served"),
        "HUEYSERVE_LOG_DIR": str(root / "logs"),
    }
    lines = [
        "| rows | concurrency | runtime | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    try:
        with hueyserve(env, batching=True) as url:
            for name in ("sklearn", "onnx"):
                files = [("file", (p.name, p.read_bytes())) for p in (root / name).iterdir()]
                response = httpx.post(f"{url}/v1/models/forest-{name}/versions", files=files)
                response.raise_for_status()
            for rows in ROWS:
                for level in (1, 8):
                    for name in ("sklearn", "onnx"):
                        target = f"{url}/v1/models/forest-{name}:predict"
                        wrk(target, level, 2, rows=rows)  # warm up
                        m = wrk(target, level, seconds, rows=rows)
                        lines.append(
                            f"| {rows} | {level} | {name} | {m['rate']:.0f} | {m['p50']:.2f} "
                            f"| {m['p99']:.2f} | {m['errors']:.0f} |"
                        )
                        print(lines[-1], flush=True)
    finally:
        redis.stop()
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1000, help="timed calls per cell")
    parser.add_argument("--seconds", type=float, default=5, help="wrk run per served cell")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hueyserve-bench-") as root:
        runtimes = build(Path(root))
        table = "In-process `predict` of the runtime:\n\n" + report(runtimes, args.repeats)
        print(table, flush=True)
        table += "\nServed (sync v1 through the queue):\n\n" + served(Path(root), args.seconds)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtimes.md").write_text(table)
    print(f"wrote {RESULTS}/runtimes.md")


if __name__ == "__main__":
    main()
