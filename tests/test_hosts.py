"""Two worker hosts that share no disk (issue 12): two real `huey_consumer` processes, each
with a model folder of its own, behind one real API. A model is one thing everywhere: the
demos are made once, a version imported (by the command line) or trained through one host is
served by the other, with the same answers, also after the host that made it is killed."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx2 as httpx
import numpy as np
import pytest
import redis
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier

from hueyserve import wire
from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.dev.redis_server import free_port
from hueyserve.dev.stack import PROTOCOL, stop
from hueyserve.training import DEMOS
from hueyserve.worker.publishing import entries
from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FLOWER = [5.9, 3.0, 5.1, 1.8]


class Deployment(NamedTuple):
    base: str
    hosts: dict[str, subprocess.Popen[bytes]]  #: host folder name -> its consumer
    folders: dict[str, Path]


def spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)


@pytest.fixture
def deployment(redis_conn: redis.Redis, tmp_path: Path) -> Iterator[Deployment]:
    env = {**os.environ, "HUEYSERVE_LOG_DIR": str(tmp_path / "logs")}
    folders = {name: tmp_path / name / "models" for name in ("a", "b")}
    hosts = {
        name: spawn(
            [str(BIN / "huey_consumer"), "core.huey", "-k", "thread", "-w", "2"],
            {**env, "HUEYSERVE_MODEL_DIR": str(folder)},
        )
        for name, folder in folders.items()
    }
    port = free_port()
    api = spawn(
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-config", "config/logger.config", "--http", PROTOCOL],
        {**env, "HUEYSERVE_MODEL_DIR": str(tmp_path / "api-has-no-models")},
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base), "the deployment to be ready", timeout_s=60)
        wait_for(lambda: redis_conn.zcard(wire.HEARTBEATS_KEY) == 2, "both hosts' heartbeats")
        yield Deployment(base, hosts, folders)
    finally:
        codes = [stop(api, "api"), *(stop(p, f"host {n}") for n, p in hosts.items())]
        assert codes[0] == 0 and all(code in (0, -signal.SIGKILL) for code in codes), codes


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def answers_by_host(
    http: httpx.Client, model: str, rows: list[list[float]], count: int = 40
) -> dict[str, set[str]]:
    """Submit the same rows as `count` async jobs: {worker: the answers it gave}."""
    ids = [
        http.post("/v1/jobs", json={"model": model, "instances": rows}).json()["job_id"]
        for _ in range(count)
    ]
    found: dict[str, set[str]] = {}
    for job_id in ids:
        job = wait_for(
            lambda job_id=job_id: (
                (body := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("done", "failed")
                and body
            ),
            f"job {job_id}",
        )
        assert job["status"] == "done", job
        found.setdefault(job["worker"], set()).add(json.dumps(job["result"]["predictions"]))
    return found


def test_two_hosts_without_a_shared_disk_serve_one_model_everywhere(
    deployment: Deployment, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    catalog = wait_for(
        lambda: (found := entries(redis_conn)).keys() >= DEMOS.keys() and found, "both demos"
    )
    assert {name: catalog[name].version_list() for name in DEMOS} == {n: ["1"] for n in DEMOS}
    made = [name for name, folder in deployment.folders.items() if (folder / "iris").exists()]
    assert made, "a host made the demos"

    # A version imported through the command line from a file on disk, on neither host.
    x, y = load_iris(return_X_y=True)
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    onnx_file = tmp_path / "forest.onnx"
    onnx_file.write_bytes(
        to_onnx(forest, x[:1].astype(np.float32), options={"zipmap": False}).SerializeToString()
    )
    command = [sys.executable, "-m", "hueyserve", "--url", deployment.base, "import", "flowers",
               str(onnx_file), "--example", json.dumps([FLOWER])]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    imported = json.loads(done.stdout)
    assert (imported["model_version"], imported["runtime"]) == ("1", "onnx")
    sha = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    assert imported["files"]["model.onnx"]["sha256"] == sha

    with httpx.Client(base_url=deployment.base, timeout=30) as http:
        for model, rows in (("diabetes", EXAMPLE_ROWS), ("flowers", [FLOWER])):
            found = answers_by_host(http, model, rows)
            assert len(found) == 2, f"both hosts answered {model}: {found}"
            assert len(set().union(*found.values())) == 1, f"one answer for {model}: {found}"
        for folder in deployment.folders.values():  # each host fetched its copy, checked
            copy = folder / "flowers" / "1" / "model.onnx"
            assert hashlib.sha256(copy.read_bytes()).hexdigest() == sha

        # Trained through one host, served by the other once the trainer is gone.
        accepted = http.post("/v1/models/diabetes/train", json={"params": {"n_estimators": 10}})
        job = wait_for(
            lambda: (
                (body := http.get(accepted.headers["Location"]).json())["status"] == "done" and body
            ),
            "the training",
            timeout_s=60,
        )
        assert job["result"]["model_version"] == "2"
        trainer_pid = int(job["worker"].rsplit(":", 1)[1])
        trainer = next(p for p in deployment.hosts.values() if p.pid == trainer_pid)
        survivor = next(n for n, p in deployment.hosts.items() if p.pid != trainer_pid)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait(10)
        for _ in range(10):
            response = http.post("/v1/models/diabetes:predict", json={"instances": EXAMPLE_ROWS})
            assert response.status_code == 200, response.text
            assert response.headers["X-Model-Version"] == "2"
        assert (deployment.folders[survivor] / "diabetes" / "2" / "model.skops").is_file()

        # A folder dropped into the survivor's store is imported, then served.
        dropped = deployment.folders[survivor] / "dropped" / "1"
        dropped.mkdir(parents=True)
        (dropped / "model.onnx").write_bytes(onnx_file.read_bytes())
        wait_for(lambda: "dropped" in entries(redis_conn), "the dropped folder's import")
        response = http.post("/v1/models/dropped:predict", json={"instances": [FLOWER]})
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["label"] == int(forest.predict([FLOWER])[0])
