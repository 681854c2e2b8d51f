"""A whole deployment of real processes for tests that kill or restart its parts: a Redis
with an append-only file (as `make run`'s), consumers and an API (uvicorn with hueyserve's
protocol, as `make run` starts it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import redis

from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from hueyserve.dev.stack import PROTOCOL, stop
from tests.helpers import BIN, spawn, wait_for


class FaultStack:
    """A Redis with an append-only file, consumers and an API, each killable."""

    def __init__(self, tmp_path: Path, demo_models: Path, **env: str) -> None:
        shutil.copytree(demo_models, tmp_path / "models")
        self.redis = EmbeddedRedis(port=free_port(), data_dir=tmp_path / "redis")
        self.redis.start()
        self.env = {
            **os.environ,
            "REDIS_URL": self.redis.url,
            "HUEYSERVE_MODEL_DIR": str(tmp_path / "models"),
            "HUEYSERVE_LOG_DIR": str(tmp_path / "logs"),
            "HUEYSERVE_LEASE_S": "2",
            **env,
        }
        self.consumers: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api_console = tmp_path / "api.log"
        self.api = self.start_api()

    def start_api(self) -> subprocess.Popen[bytes]:
        return spawn(
            [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port",
             str(self.port), "--log-level", "warning", "--http", PROTOCOL],
            self.env,
            self.api_console,
        )  # fmt: skip

    def restart_api(self) -> None:
        """Stop the API (gracefully: its streams end) and start another on the same port."""
        stop(self.api)
        self.api = self.start_api()
        wait_for(self.ready, "the restarted API to be ready", timeout_s=30)

    def add_consumer(self, console: Path | None = None) -> subprocess.Popen[bytes]:
        consumer = spawn(
            [str(BIN / "huey_consumer"), "core.huey", "-k", "thread", "-w", "4", "-m", "1"],
            self.env,
            console,
        )
        self.consumers.append(consumer)
        return consumer

    def conn(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url, socket_timeout=2)

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.base}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        stop(self.api)
        for consumer in self.consumers:
            stop(consumer)
        self.redis.stop()


@pytest.fixture
def faults(tmp_path: Path, demo_models: Path) -> Iterator[FaultStack]:
    stack = FaultStack(tmp_path, demo_models)
    try:
        yield stack
    finally:
        stack.close()
