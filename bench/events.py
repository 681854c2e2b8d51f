"""What the event stream costs: Redis memory per 10,000 jobs, and how many SSE clients one API
process holds while it serves predictions.

    .venv/bin/python -m bench.events            # about two minutes

One embedded Redis, one consumer (8 threads) and one API process (uvicorn, hueyserve's
protocol). (1) 10,000 sync predictions (fresh rows: no cache hit), the stream's length and
`MEMORY USAGE` before and after. (2) wrk at 16 connections for 10 s against the predict route
while N clients follow GET /v1/events (each receives every event of every job): requests per
second, p50/p99, and the share of the events written that every follower received.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import httpx2 as httpx
import numpy as np
import redis

from bench.run import hueyserve, wrk
from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from hueyserve.sse import Parser
from hueyserve.wire import EVENTS_KEY, job_key
from hueyserve.worker.fitting import ensure_demo_models
from hueyserve.worker.store import ModelStore

PREDICT = "/v1/models/diabetes:predict"


async def predictions(base: str, count: int, concurrency: int = 32) -> None:
    rng = np.random.default_rng(0)
    rows = (rng.normal(scale=0.05, size=(count, 10))).tolist()
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:

        async def one(row: list[float]) -> None:
            async with gate:
                response = await client.post(PREDICT, json={"instances": [row]})
                response.raise_for_status()

        await asyncio.gather(*(one(row) for row in rows))


def memory(conn: redis.Redis, base: str, jobs: int) -> None:
    before_len, before_bytes = conn.xlen(EVENTS_KEY), conn.memory_usage(EVENTS_KEY, samples=0) or 0
    asyncio.run(predictions(base, jobs))
    after_len, after_bytes = conn.xlen(EVENTS_KEY), conn.memory_usage(EVENTS_KEY, samples=0) or 0
    added, grown = after_len - before_len, after_bytes - before_bytes
    print(f"\n{jobs} sync predictions: {added} events ({added / jobs:.2f} per job), stream "
          f"{grown / 1e6:.2f} MB more ({grown / added:.0f} bytes per event, "
          f"{grown / jobs * 10_000 / 1e6:.2f} MB per 10,000 jobs)")  # fmt: skip


async def followers(base: str, n: int, seconds: float) -> tuple[dict[str, float], list[int]]:
    """wrk against predict while `n` clients follow /v1/events; the events each received."""
    received = [0] * n
    ready = asyncio.Event()
    connected = 0

    async def follow(i: int, client: httpx.AsyncClient) -> None:
        nonlocal connected
        async with client.stream("GET", "/v1/events") as response:
            connected += 1
            if connected == n:
                ready.set()
            parser = Parser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None and event.data:
                    received[i] += 1

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        tasks = [asyncio.create_task(follow(i, client)) for i in range(n)]
        if n:
            await asyncio.wait_for(ready.wait(), timeout=60)
        measured = await asyncio.to_thread(wrk, base + PREDICT, 16, seconds)
        await asyncio.sleep(2)  # the last events reach the followers
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return measured, received


async def idle_streams(
    base: str, conn: redis.Redis, n: int, seconds: float, api_pid: int
) -> tuple[dict[str, float], int, float]:
    """wrk against predict while `n` clients each hold the stream of a job that stays queued
    (a record with no task: it never changes); how many were open, and the API's RSS (MB)."""
    ids = [f"bench-idle-{i}" for i in range(n)]
    with conn.pipeline(transaction=False) as pipe:
        for job_id in ids:
            fields = {"id": job_id, "kind": "predict", "model": "diabetes", "status": "queued"}
            pipe.hset(job_key(job_id), mapping=fields)
            pipe.expire(job_key(job_id), 600)
        pipe.execute()
    opened = 0

    async def hold(job_id: str, client: httpx.AsyncClient) -> None:
        nonlocal opened
        async with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
            opened += response.status_code == 200
            async for _ in response.aiter_lines():
                pass

    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        tasks = [asyncio.create_task(hold(job_id, client)) for job_id in ids]
        while opened < n:
            await asyncio.sleep(0.2)
        measured = await asyncio.to_thread(wrk, base + PREDICT, 16, seconds)
        rss = int(Path(f"/proc/{api_pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGESIZE")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return measured, opened, rss / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--followers", default="0,10,50")
    parser.add_argument("--idle", default="0,1000,3000")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hueyserve-bench-events-"))
    store = ModelStore(workdir / "models")
    ensure_demo_models(store, workdir)
    with EmbeddedRedis(port=free_port()) as server:
        env = {
            **os.environ, "REDIS_URL": server.url, "HUEYSERVE_MODEL_DIR": str(store.root),
            "HUEYSERVE_LOG_DIR": str(workdir / "logs"), "HUEYSERVE_EVENTS_MAX_LEN": "1000000",
        }  # fmt: skip
        conn = redis.Redis.from_url(server.url)
        with hueyserve(env, batching=True) as base:
            memory(conn, base, args.jobs)
            print("\nfollowers of /v1/events | req/s | p50 ms | p99 ms | least share received")
            for n in (int(x) for x in args.followers.split(",")):
                start = conn.xlen(EVENTS_KEY)
                measured, received = asyncio.run(followers(base, n, args.seconds))
                written = conn.xlen(EVENTS_KEY) - start
                least = f"{min(received) / written:.3f}" if n else "-"
                print(f"{n:>24} | {measured['rate']:>5.0f} | {measured['p50']:>6.1f} | "
                      f"{measured['p99']:>6.1f} | {least}")  # fmt: skip
            print("\nidle job streams held | req/s | p50 ms | p99 ms | API RSS MB")
            api_pid = _api_pid(base)
            for n in (int(x) for x in args.idle.split(",")):
                measured, opened, rss = asyncio.run(
                    idle_streams(base, conn, n, args.seconds, api_pid)
                )
                print(f"{opened:>21} | {measured['rate']:>5.0f} | {measured['p50']:>6.1f} | "
                      f"{measured['p99']:>6.1f} | {rss:.0f}")  # fmt: skip


def _api_pid(base: str) -> int:
    """The uvicorn process serving `base` (its port is in its command line)."""
    port = base.rsplit(":", 1)[1]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"uvicorn" in b" ".join(argv) and port.encode() in argv:
                return int(proc.name)
    raise RuntimeError(f"no uvicorn on port {port}")


if __name__ == "__main__":
    main()
