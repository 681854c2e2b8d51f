"""Sync-predict latency before and while a training job runs on the same workers.

Training is queued at the lowest priority, but once a worker runs it, it shares the machine's
cores with the predictions. This measures what that costs a client: distinct rows (every one
a cache miss, so every one crosses the queue and a worker) from a few concurrent clients,
first with the workers otherwise idle, then while a large forest trains. The forest is a
separate model (`diabetes_big`), so the model being measured stays the same.

make run                                  # in another terminal
.venv/bin/python -m bench.predict_during_training --trees 400
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time

import httpx2 as httpx

from bench.sync_latency import percentile
from hueyserve.api.schemas import EXAMPLE_ROWS

PREDICT = "/v1/models/diabetes:predict"


def measure(url: str, clients: int, until: threading.Event) -> list[float]:
    """Latencies (ms) of sync predicts from `clients` threads until `until` is set."""
    latencies: list[float] = []

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            while not until.is_set():
                row = [v * (1 + random.uniform(-0.05, 0.05)) for v in EXAMPLE_ROWS[0]]
                start = time.perf_counter()
                http.post(PREDICT, json={"instances": [row]}).raise_for_status()
                latencies.append((time.perf_counter() - start) * 1000)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def timed(url: str, clients: int, seconds: float) -> list[float]:
    done = threading.Event()
    threading.Timer(seconds, done.set).start()
    return measure(url, clients, done)


def during_training(url: str, clients: int, trees: int) -> tuple[list[float], float]:
    """Latencies while a training job of `trees` trees runs, and how long the job took."""
    with httpx.Client(base_url=url, timeout=30) as http:
        body = {
            "dataset": "diabetes",
            "estimator": "RandomForestRegressor",
            "params": {"n_estimators": trees},
        }
        location = http.post("/v1/models/diabetes_big/train", json=body).headers["Location"]
        while http.get(location).json()["status"] == "queued":
            time.sleep(0.01)
        done = threading.Event()
        started = time.perf_counter()

        def watch() -> None:
            while http.get(location).json()["status"] == "running":
                time.sleep(0.05)
            done.set()

        watcher = threading.Thread(target=watch)
        watcher.start()
        latencies = measure(url, clients, done)
        watcher.join()
        return latencies, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--trees", type=int, default=400, help="forest size of the training job")
    parser.add_argument("--seconds", type=float, default=10, help="length of the idle baseline")
    args = parser.parse_args()
    idle = timed(args.url, args.clients, args.seconds)
    busy, took = during_training(args.url, args.clients, args.trees)
    print(f"training job: RandomForestRegressor, {args.trees} trees, ran {took:.1f} s")
    print(f"{args.clients} concurrent clients, distinct rows (all cache misses)\n")
    print("| workers | requests | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|")
    for label, values, seconds in (("idle", idle, args.seconds), ("training", busy, took)):
        p50, p99 = statistics.median(values), percentile(values, 99)
        rate = len(values) / seconds
        print(f"| {label} | {len(values)} | {rate:.0f} | {p50:.2f} | {p99:.2f} |")


if __name__ == "__main__":
    main()
