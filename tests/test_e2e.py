"""The README's command lines for real: `huey_consumer core.huey` and `uvicorn main:app` as
subprocesses on the session's Redis, then HTTP and a short locust run against them."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import redis

from hueyserve.redis_server import free_port
from hueyserve.schemas import EXAMPLE_ROWS
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


def stop(process: subprocess.Popen[bytes]) -> int:
    """Ctrl-C (graceful for both uvicorn and huey_consumer), then kill if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture
def stack(redis_conn: redis.Redis, demo_models: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A real consumer and a real uvicorn; yields the base URL and the worker log folder."""
    import shutil

    shutil.copytree(demo_models, tmp_path / "models")
    env = {
        **os.environ,
        "HUEYSERVE_MODEL_DIR": str(tmp_path / "models"),
        "HUEYSERVE_LOG_DIR": str(tmp_path / "logs"),
    }
    port = free_port()
    consumer = spawn([str(BIN / "huey_consumer"), "core.huey", "-k", "thread", "-w", "2"], env)
    api = spawn(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-config", "config/logger.config"],
        env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), "the stack to be ready", timeout_s=60)
        yield base, tmp_path / "logs"
    finally:
        assert stop(api) == 0
        assert stop(consumer) == 0


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_stack_serves_sync_and_async(stack: tuple[str, Path]) -> None:
    base, log_dir = stack
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
    assert "Executing core.predict" in (log_dir / "huey.log").read_text()
    assert f"GET {location} HTTP/1.1" in (ROOT / "logs" / "access.log").read_text()


def test_locust_scenarios_run_without_failures(stack: tuple[str, Path], tmp_path: Path) -> None:
    base, _ = stack
    prefix = tmp_path / "load"
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "locustfile.py", "--headless", "--users", "6",
         "--spawn-rate", "6", "--run-time", "4s", "--stop-timeout", "10", "--host", base,
         "--csv", str(prefix), "--only-summary"],
        cwd=ROOT, capture_output=True, text=True, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    with open(f"{prefix}_stats.csv") as handle:
        total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, result.stderr[-2000:]
