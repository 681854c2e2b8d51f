"""Helpers every test module may use (test modules never import one another).

Importing this module reads no settings and imports neither `core` nor `main`: conftest.py
sets the environment first.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi.testclient import TestClient

from hueyserve.training import TrainPlan
from hueyserve.worker.fitting import train

if TYPE_CHECKING:
    from hueyserve.api.services import Services

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  #: the virtualenv's scripts: huey_consumer, uvicorn
PREDICT = "/v1/models/diabetes:predict"


def wait_for(condition: Callable[[], Any], what: str, timeout_s: float = 10.0) -> Any:
    """Poll `condition` until it is truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def poll_job(
    client: TestClient, job_id: str, status: str = "done", timeout_s: float = 10.0
) -> dict[str, Any]:
    """The job once it reads `status` (fails the test after `timeout_s`)."""

    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] == status else None

    result: dict[str, Any] = wait_for(finished, f"job {job_id} to be {status}", timeout_s)
    return result


def services_of(client: TestClient) -> Services:
    """The services of the API process behind `client` (started: inside `with client`)."""
    services: Services = client.app.state.services  # type: ignore[attr-defined]
    return services


def spawn(
    command: list[str], env: dict[str, str], output: Path | None = None
) -> subprocess.Popen[bytes]:
    """A real process in the repository root, in a session of its own (stopped by PID);
    its console goes to `output` when given."""
    if output is None:
        return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    with open(output, "wb") as console:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, start_new_session=True, stdout=console, stderr=console
        )


def cmdline(pid: int) -> str | None:
    """A process's command line (None once it is gone)."""
    try:
        return (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")).decode(
            errors="replace"
        )
    except OSError:
        return None


def children(pid: int) -> dict[int, str]:
    """Processes whose parent is `pid`, with their command lines (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        command = cmdline(int(stat.parent.name)) if parent == pid else None
        if command is not None:
            found[int(stat.parent.name)] = command
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def train_diabetes(n_estimators: int) -> tuple[Any, dict[str, Any]]:
    """A small forest on scikit-learn's diabetes data, with the metadata to save it with."""
    return train(
        TrainPlan("diabetes", "RandomForestRegressor", {"n_estimators": n_estimators}), Path()
    )


class GateModel:
    """Test-only model: the first call blocks until `release` is set; every call is logged.

    Predicts the first feature of each row, so the log shows which job ran when.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls: list[float] = []
        self._lock = threading.Lock()

    def predict(self, features: Any) -> Any:
        with self._lock:
            self.calls.append(float(features[0][0]))
        self.started.set()
        self.release.wait(timeout=30)
        return features[:, 0]


class FlakyModel:
    """Test-only model: fails its first `failures` calls, then sums each row."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def predict(self, features: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"flaky failure {self.calls}")
        return features.sum(axis=1)
