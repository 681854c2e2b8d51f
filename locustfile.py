"""Load scenarios for a running stack: `make load` (headless, bounded) or `locust -f locustfile.py`.

Inputs are real rows of scikit-learn's diabetes and iris data sets with a little noise, so most
requests are distinct (cache misses); CachedPredictUser repeats a few rows to exercise the cache.
"""

from __future__ import annotations

import random
import time
from typing import ClassVar

from locust import HttpUser, between, task
from sklearn.datasets import load_diabetes, load_iris

ROWS = load_diabetes().data.tolist()
FLOWERS = load_iris().data.tolist()
PREDICT = "/v1/models/diabetes:predict"
POLL_TIMEOUT_S = 30.0


def noisy_rows(count: int, rows: list[list[float]] = ROWS) -> list[list[float]]:
    """`count` real rows, each feature nudged by up to 1% so requests rarely repeat."""
    return [
        [value * (1 + random.uniform(-0.01, 0.01)) for value in random.choice(rows)]
        for _ in range(count)
    ]


class SyncPredictUser(HttpUser):
    """Interactive client: one blocking predict of 1-4 rows at a time."""

    weight = 3
    wait_time = between(0.05, 0.2)

    @task
    def predict(self) -> None:
        self.client.post(PREDICT, json={"instances": noisy_rows(random.randint(1, 4))})


class V2InferUser(HttpUser):
    """Open Inference Protocol v2 client: the iris classifier, class and probabilities."""

    weight = 1
    wait_time = between(0.05, 0.2)

    @task
    def infer(self) -> None:
        rows = noisy_rows(random.randint(1, 4), FLOWERS)
        tensor = {"name": "features", "shape": [len(rows), 4], "datatype": "FP64", "data": rows}
        self.client.post("/v2/models/iris/infer", json={"inputs": [tensor]})


class AsyncJobUser(HttpUser):
    """Batch client: submit a job of 8-32 rows, then poll it until it is done."""

    weight = 1
    wait_time = between(0.2, 0.5)

    @task
    def submit_and_poll(self) -> None:
        body = {"model": "diabetes", "instances": noisy_rows(random.randint(8, 32))}
        with self.client.post("/v1/jobs", json=body, catch_response=True) as response:
            if response.status_code != 202:
                response.failure(f"submit answered {response.status_code}: {response.text}")
                return
            job_id = response.json()["job_id"]
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while time.monotonic() < deadline:
            with self.client.get(
                f"/v1/jobs/{job_id}", name="/v1/jobs/[id]", catch_response=True
            ) as poll:
                status = poll.json().get("status") if poll.status_code == 200 else None
                if status == "done":
                    return
                if status == "failed" or poll.status_code != 200:
                    poll.failure(f"job {job_id}: {poll.text}")
                    return
            time.sleep(0.1)
        self.environment.events.request.fire(
            request_type="JOB", name="job done", response_time=POLL_TIMEOUT_S * 1000,
            response_length=0, exception=TimeoutError(f"job {job_id} not done"), context={},
        )  # fmt: skip


class CachedPredictUser(HttpUser):
    """Dashboard-like client: asks the same few questions again and again (cache hits)."""

    weight = 1
    wait_time = between(0.05, 0.2)
    questions: ClassVar[list[list[list[float]]]] = [[row] for row in ROWS[:5]]

    @task
    def predict_again(self) -> None:
        self.client.post(PREDICT, json={"instances": random.choice(self.questions)})
