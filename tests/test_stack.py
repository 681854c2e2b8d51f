"""`make run`'s supervisor (hueyserve.dev.stack) as an operator meets it: a killed consumer is
started again while the API goes on serving, and Ctrl-C still stops everything."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
import redis

from hueyserve.dev.credentials import load_or_create
from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from tests.helpers import ROOT, alive, children, cmdline, wait_for


def test_a_killed_consumer_is_restarted_while_the_api_serves(
    redis_server: EmbeddedRedis, redis_conn: redis.Redis, demo_models: Path, tmp_path: Path
) -> None:
    """Issue 11.12: the supervisor stopped the whole stack when its consumer died."""
    shutil.copytree(demo_models, tmp_path / "models")
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "logger.config", tmp_path / "config")
    for folder in ("logs", "metrics"):
        (tmp_path / folder).mkdir()
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "PYTHONPATH": str(ROOT),
        "HUEYSERVE_MODEL_DIR": str(tmp_path / "models"),
        "HUEYSERVE_LOG_DIR": str(tmp_path / "logs"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        "HUEYSERVE_WORKERS": "2",
    }
    base = f"http://127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "hueyserve.dev.stack", "--port", base.rsplit(":", 1)[1]]
    log = tmp_path / "stack.log"
    with open(log, "wb") as output:
        stack = subprocess.Popen(
            command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started: dict[int, str] = {}  # every process the stack started, to leave none behind

    def consumers() -> list[int]:
        found = children(stack.pid)
        started.update(found)
        return [pid for pid, cmd in found.items() if "huey_consumer" in cmd]

    def ready() -> bool:
        started.update(children(stack.pid))
        try:
            return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(ready, "the stack to be ready", timeout_s=60)
        wait_for(lambda: "ready: " in log.read_text(), "the stack to say it is ready")
        secret = tmp_path / "data" / "secret"  # none was given: the stack made one
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_text().strip()
        (first,) = consumers()
        os.kill(first, signal.SIGKILL)  # as the OOM killer would
        assert httpx.get(f"{base}/v2/health/live", timeout=2).status_code == 200
        wait_for(lambda: [p for p in consumers() if p != first], "a new consumer", 15)
        wait_for(ready, "the stack to be ready again", timeout_s=60)
        row = {"instances": [[0.06] * 10]}  # a new row: the new consumer computes it
        predict = httpx.post(f"{base}/v1/models/diabetes:predict", json=row, timeout=30)
        assert predict.status_code == 200 and predict.headers["X-Cache"] == "miss"
        restarted = 'hueyserve_process_restarts_total{process="consumer"} 1.0'
        wait_for(lambda: restarted in httpx.get(f"{base}/metrics", timeout=5).text, "a count")
        assert "consumer (pid" in log.read_text() and "restarting it in 1s" in log.read_text()
        stack.send_signal(signal.SIGINT)  # Ctrl-C
        assert stack.wait(60) == 0
        assert not children(stack.pid) and not any(map(alive, started))
    finally:
        started.update(children(stack.pid))
        if stack.poll() is None:  # stop it as Ctrl-C would, so it stops what it started
            stack.send_signal(signal.SIGINT)
            try:
                stack.wait(60)
            except subprocess.TimeoutExpired:
                stack.kill()
                stack.wait()
        for pid, command_line in started.items():
            if alive(pid) and cmdline(pid) == command_line:  # still ours, not a reused pid
                os.kill(pid, signal.SIGKILL)


def test_secrets_are_created_once_and_readable_by_their_user_only(tmp_path: Path) -> None:
    """Issue 11.1: `make run` signs what goes through Redis and locks its Redis by default."""
    path = tmp_path / "data" / "secret"
    first = load_or_create(path)
    assert len(first) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.chmod(0o644)  # somebody loosened it
    assert load_or_create(path) == first and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create(tmp_path / "other") != first
