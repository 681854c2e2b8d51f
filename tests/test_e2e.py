"""The README's command lines for real: `huey_consumer core.huey` and `uvicorn main:app` as
subprocesses on the session's Redis, then HTTP and a short locust run against them."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import httpx2 as httpx
import numpy as np
import pytest
import redis

import core
from hueyserve import training
from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.dev.redis_server import free_port
from hueyserve.dev.stack import PROTOCOL, stop
from hueyserve.worker import fitting
from hueyserve.worker.store import ModelStore
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


HEADER_TIMEOUT_S = 3.0  # short, so that the slow-client test need not wait long
BODY_TIMEOUT_S = 3.0


class Stack(NamedTuple):
    base: str  #: the API's URL
    logs: Path  #: the worker log folder
    consumer: subprocess.Popen[bytes]


@pytest.fixture
def stack(redis_conn: redis.Redis, demo_models: Path, tmp_path: Path) -> Iterator[Stack]:
    """A real consumer and a real uvicorn."""
    import shutil

    shutil.copytree(demo_models, tmp_path / "models")
    env = {
        **os.environ,
        "HUEYSERVE_MODEL_DIR": str(tmp_path / "models"),
        "HUEYSERVE_LOG_DIR": str(tmp_path / "logs"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),  # as `make run` sets it
        "HUEYSERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "HUEYSERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
    }
    (tmp_path / "metrics").mkdir()
    port = free_port()
    consumer = spawn([str(BIN / "huey_consumer"), "core.huey", "-k", "thread", "-w", "4"], env)
    api = spawn(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-config", "config/logger.config", "--http", PROTOCOL],
        env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), "the stack to be ready", timeout_s=60)
        yield Stack(base, tmp_path / "logs", consumer)
    finally:
        # Both first, then the check: a failed check must not leave a consumer running that
        # would take the next tests' tasks.
        codes = [stop(api, "api"), stop(consumer, "consumer")]
        assert codes == [0, 0], f"the stack did not stop cleanly (exit codes {codes})"


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_stack_serves_sync_and_async(stack: Stack) -> None:
    base, log_dir = stack.base, stack.logs
    with httpx.Client(base_url=base, timeout=20) as http:
        sync = http.post("/v1/models/diabetes:predict", json={"instances": EXAMPLE_ROWS})
        assert sync.status_code == 200 and len(sync.json()["predictions"]) == 2
        accepted = http.post(
            "/v1/models/diabetes:predict",
            json={"instances": EXAMPLE_ROWS},
            headers={"Prefer": "respond-async"},
        )
        assert accepted.status_code == 202
        location = accepted.headers["Location"]
        job = wait_for(
            lambda: (body := http.get(location).json())["status"] == "done" and body, "the job"
        )
        assert job["result"]["predictions"] == sync.json()["predictions"]
        # the API's /metrics adds up the worker process's metrics too
        metrics = http.get("/metrics").text
        assert 'hueyserve_task_seconds_count{outcome="ok",task="predict"} 2.0' in metrics
        assert 'hueyserve_batch_rows_count{model="diabetes"} 1.0' in metrics  # 2nd: cached
    assert "Executing core.predict" in (log_dir / "huey.log").read_text()
    assert f"GET {location} HTTP/1.1" in (ROOT / "logs" / "access.log").read_text()


def test_locust_scenarios_run_without_failures(stack: Stack) -> None:
    """Every user class of locustfile.py, until 60 requests have been made (a count, not a
    run time, so a busy machine makes it slower, not red)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "locust_until.py"), stack.base, "60", "60"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    totals = json.loads(result.stdout.strip().splitlines()[-1])
    assert totals["requests"] >= 60, totals
    assert totals["failures"] == 0, totals
    assert len(totals["users"]) == 4 and len(totals["by_name"]) >= 4, totals


FLOWERS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]


def test_standard_v2_client_gets_correct_predictions(stack: Stack, tmp_path: Path) -> None:
    """tritonclient, the most used v2 client, unchanged (binary tensors by default), on both
    models, by active version (2, promoted by the periodic refresh) and by explicit version."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    base = stack.base
    store = ModelStore(tmp_path / "models")
    for name, plan in training.DEMOS.items():  # a second version, dropped in by hand
        store.save(name, *fitting.train(replace(plan, random_state=7), Path()))
    core.huey.enqueue(core.refresh_models.s())  # what the crontab does every minute
    client = triton.InferenceServerClient(url=base.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        wait_for(
            lambda: all(
                client.get_model_metadata(name)["parameters"]["version"] == "2"
                for name in training.DEMOS
            ),
            "version 2 of both models to be active",
        )
        assert client.is_model_ready("iris") and client.is_model_ready("diabetes", "1")
        assert client.get_server_metadata()["name"] == "hueyserve"
        assert client.get_model_metadata("diabetes")["versions"] == ["1", "2"]

        for name, rows in (("diabetes", EXAMPLE_ROWS), ("iris", FLOWERS)):
            for asked, served in (("", "2"), ("1", "1")):
                model = store.load(name, served)
                data = np.array(rows, dtype=np.float32)
                tensor = triton.InferInput("features", list(data.shape), "FP32")
                tensor.set_data_from_numpy(data)  # binary: Triton's binary tensor extension
                result = client.infer(name, [tensor], model_version=asked, request_id="r1")
                response = result.get_response()
                assert (response["id"], response["model_version"]) == ("r1", served)
                predicted = result.as_numpy("predict")
                if name == "iris":
                    predicted = [label.decode() for label in predicted]
                    probabilities = result.as_numpy("predict_proba")
                    assert np.allclose(probabilities, model.predict_proba(data.astype(float)))
                assert list(predicted) == model.predict(data.astype(float)).tolist()

        data = np.array(FLOWERS)  # JSON both ways, some outputs, Triton's schedule policy
        tensor = triton.InferInput("features", list(data.shape), "FP64")
        tensor.set_data_from_numpy(data, binary_data=False)
        outputs = [triton.InferRequestedOutput("predict_proba", binary_data=False)]
        result = client.infer("iris", [tensor], outputs=outputs, priority=1, timeout=5_000_000)
        assert np.allclose(
            result.as_numpy("predict_proba"), store.load("iris", "2").predict_proba(data)
        )
        assert result.as_numpy("predict") is None

        wrong = triton.InferInput("features", [1, 3], "FP64")
        wrong.set_data_from_numpy(np.zeros((1, 3)))
        with pytest.raises(InferenceServerException, match=r"takes \[rows, 10\]"):
            client.infer("diabetes", [wrong])
    finally:
        client.close()


def test_hot_reload_under_load_fails_no_request(stack: Stack, tmp_path: Path) -> None:
    """Switch versions back and forth with reload, then let the periodic refresh promote a new
    version, while 8 clients predict: every request succeeds with the answer of the version
    it names, and none that starts after a switch gets the old one (cache included)."""
    base = stack.base
    with httpx.Client(base_url=base, timeout=30) as http:
        accepted = http.post("/v1/models/diabetes/train", json={"params": {"n_estimators": 20}})
        job = wait_for(
            lambda: (
                (body := http.get(accepted.headers["Location"]).json())["status"] == "done" and body
            ),
            "version 2 to be trained",
            timeout_s=60,
        )
    assert job["result"]["model_version"] == "2"
    rows = np.random.default_rng(0).normal(scale=0.05, size=(300, 10))
    store = ModelStore(tmp_path / "models")
    calls: list[tuple[float, float, int, str, int, Any]] = []
    stop_load = threading.Event()

    def load(seed: int) -> None:
        pick = random.Random(seed)
        with httpx.Client(base_url=base, timeout=30) as client:
            while not stop_load.is_set():
                index = pick.randrange(len(rows))
                started = time.monotonic()
                response = client.post(
                    "/v1/models/diabetes:predict", json={"instances": [rows[index].tolist()]}
                )
                body = response.json()
                version = response.headers.get("X-Model-Version", "?")
                calls.append(
                    (started, time.monotonic(), response.status_code, version, index, body)
                )

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    switches = []  # (asked at, answered at, active version)
    with httpx.Client(base_url=base, timeout=30) as admin:
        for version in ["1", None, "1", None, "1", None]:
            time.sleep(0.4)
            asked = time.monotonic()
            response = admin.post("/v1/models/diabetes/reload", json={"version": version})
            assert response.status_code == 200, response.text
            switches.append((asked, time.monotonic(), response.json()["active_version"]))
    time.sleep(0.4)
    store.save(
        "diabetes", *fitting.train(replace(training.DEMOS["diabetes"], random_state=3), Path())
    )
    refreshed_at = time.monotonic()
    core.huey.enqueue(core.refresh_models.s())  # what the crontab does every minute
    first_v3 = wait_for(lambda: min((c[1] for c in calls if c[3] == "3"), default=None), "v3")
    time.sleep(0.4)
    stop_load.set()
    for thread in threads:
        thread.join(30)

    assert len(calls) > 100
    failures = [c for c in calls if c[2] != 200]
    assert not failures, failures[:3]
    expected = {v: store.load("diabetes", v).predict(rows).tolist() for v in ("1", "2", "3")}
    for _, _, _, version, index, body in calls:
        assert body["predictions"] == [expected[version][index]]
    assert {c[3] for c in calls} == {"1", "2", "3"}
    ends = [s[0] for s in switches[1:]] + [refreshed_at]
    for (_, done, active), next_asked in zip(switches, ends, strict=True):
        window = [c for c in calls if c[0] > done and c[1] < next_asked]
        assert window and all(c[3] == active for c in window), (active, window[:3])
    after_refresh = [c for c in calls if c[0] > first_v3]
    assert after_refresh and all(c[3] == "3" for c in after_refresh)


def test_a_thousand_sync_requests_wait_at_once(stack: Stack) -> None:
    """One API process keeps 1,000 blocking predicts waiting (futures, not threads or
    connections) and completes them all. The consumer is paused until all 1,000 wait."""
    base = stack.base
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    rows = np.random.default_rng(1).normal(scale=0.05, size=(1000, 10)).tolist()
    peak = 0

    async def run() -> list[int]:
        nonlocal peak
        limits = httpx.Limits(max_connections=1100, max_keepalive_connections=1100)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

            async def one(row: list[float]) -> int:
                body = {"instances": [row]}
                return (await client.post("/v1/models/diabetes:predict", json=body)).status_code

            stack.consumer.send_signal(signal.SIGSTOP)
            try:
                calls = asyncio.gather(*(one(row) for row in rows))
                # A connection of its own each time: no race with uvicorn's keep-alive timeout.
                fresh = httpx.Limits(max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=base, timeout=60, limits=fresh) as monitor:
                    deadline = time.monotonic() + 30
                    while peak < 1000 and time.monotonic() < deadline:
                        await asyncio.sleep(0.2)
                        health = await monitor.get("/health")
                        peak = max(peak, health.json()["sync_waiting"])
            finally:
                stack.consumer.send_signal(signal.SIGCONT)
            return await calls

    statuses = asyncio.run(run())
    assert statuses.count(200) == 1000, {s: statuses.count(s) for s in set(statuses)}
    assert peak == 1000, peak  # they really were waiting at the same time


def test_slow_clients_are_cut_off_and_others_served(stack: Stack) -> None:
    """Issue 11.16: 200 connections trickling their headers stayed open, and a body shorter
    than its Content-Length hung forever. Both now get a 408 and lose their connection."""
    port = int(stack.base.rsplit(":", 1)[1])
    trickling = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    short_body = socket.create_connection(("127.0.0.1", port))
    try:
        for sock in trickling:
            sock.sendall(b"POST /v1/models/diabetes:predict HTTP/1.1\r\nHost: x\r\n")
        short_body.sendall(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n" + b'{"model": "diabetes"'
        )
        started = time.monotonic()
        with httpx.Client(base_url=stack.base, timeout=20) as http:  # others are served
            answer = http.post("/v1/models/diabetes:predict", json={"instances": EXAMPLE_ROWS})
            assert answer.status_code == 200
        for sock in [*trickling, short_body]:
            sock.settimeout(HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 10)
            reply = _read_until_closed(sock)
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert b"HUEYSERVE_BODY_TIMEOUT_S" in reply  # the short body's: says what to change
        assert time.monotonic() - started < HEADER_TIMEOUT_S + BODY_TIMEOUT_S + 10
    finally:
        for sock in [*trickling, short_body]:
            sock.close()


def _read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received
