"""Sequential sync-predict latency against a running stack: cache misses and cache hits.

make run                                  # in another terminal
.venv/bin/python -m bench.sync_latency --requests 300
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import httpx2 as httpx

from hueyserve.api.schemas import EXAMPLE_ROWS


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100)[pct - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    misses: list[float] = []
    hits: list[float] = []
    with httpx.Client(base_url=args.url, timeout=30) as client:
        for _ in range(args.requests):
            row = [v * (1 + random.uniform(-0.01, 0.01)) for v in EXAMPLE_ROWS[0]]
            for kind, into in (("miss", misses), ("hit", hits)):
                start = time.perf_counter()
                response = client.post("/v1/models/diabetes:predict", json={"instances": [row]})
                into.append((time.perf_counter() - start) * 1000)
                response.raise_for_status()
                assert response.headers["X-Cache"] == kind, response.headers
    print("| path | requests | p50 ms | p99 ms |\n|---|---|---|---|")
    for kind, values in (("cache miss (queue + worker)", misses), ("cache hit", hits)):
        p50, p99 = statistics.median(values), percentile(values, 99)
        print(f"| {kind} | {len(values)} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
