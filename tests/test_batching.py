"""Dynamic batching in a worker: concurrent tasks of one model version share predict calls."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

import core
from hueyserve.batching import Batcher, Batchers, BatchPolicy
from hueyserve.registry import LoadedModel
from tests.conftest import wait_for


class RecordingModel:
    """Doubles each row's first feature; the first call blocks until released; every call's
    row count is logged. A negative value makes the whole call fail."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches: list[int] = []

    def predict(self, features: Any) -> Any:
        self.batches.append(len(features))
        self.started.set()
        self.release.wait(timeout=30)
        if (features < 0).any():
            raise ValueError("negative input")
        return features[:, 0] * 2


def batchers_for(model: RecordingModel, **policy: Any) -> Batchers:
    loaded = LoadedModel("m", "1", model, {"n_features": 1})
    return Batchers(lambda name, version: loaded, BatchPolicy(**policy))


def test_waiting_tasks_run_as_one_call_and_get_their_own_rows() -> None:
    model = RecordingModel()
    batchers = batchers_for(model, max_rows=64)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(batchers.predict, "m", "1", np.array([[0.0]]))
        assert model.started.wait(10)
        rest = [
            pool.submit(batchers.predict, "m", "1", np.array([[i], [i + 0.5]])) for i in range(1, 9)
        ]
        wait_for(lambda: batchers.get("m", "1").waiting == 8, "8 tasks waiting")
        model.release.set()
        assert first.result()["predict"] == [0.0]
        answers = [future.result()["predict"] for future in rest]
    assert answers == [[2.0 * i, 2.0 * i + 1] for i in range(1, 9)]
    assert model.batches == [1, 16]  # the eight waiting tasks: one call of 16 rows


def test_row_limit_splits_batches() -> None:
    model = RecordingModel()
    batchers = batchers_for(model, max_rows=5)
    with ThreadPoolExecutor(7) as pool:
        first = pool.submit(batchers.predict, "m", "1", np.array([[0.0]]))
        assert model.started.wait(10)
        rest = [pool.submit(batchers.predict, "m", "1", np.array([[i], [i]])) for i in range(1, 7)]
        wait_for(lambda: batchers.get("m", "1").waiting == 6, "6 tasks waiting")
        model.release.set()
        first.result()
        [future.result() for future in rest]
    assert model.batches == [1, 4, 4, 4]  # two 2-row tasks fit the 5-row limit, not three


def test_one_bad_input_fails_only_its_own_task() -> None:
    model = RecordingModel()
    batchers = batchers_for(model, max_rows=64)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(batchers.predict, "m", "1", np.array([[0.0]]))
        assert model.started.wait(10)
        good = [pool.submit(batchers.predict, "m", "1", np.array([[float(i)]])) for i in (1, 2)]
        bad = pool.submit(batchers.predict, "m", "1", np.array([[-1.0]]))
        wait_for(lambda: batchers.get("m", "1").waiting == 3, "3 waiting")
        model.release.set()
        first.result()
        assert [future.result()["predict"] for future in good] == [[2.0], [4.0]]
        with pytest.raises(ValueError, match="negative input"):
            bad.result()


def test_max_wait_holds_a_batch_open_for_late_tasks() -> None:
    model = RecordingModel()
    model.release.set()
    batchers = batchers_for(model, max_rows=2, max_wait_s=5.0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(batchers.predict, "m", "1", np.array([[1.0]]))
        time.sleep(0.1)  # the leader is waiting for a second row
        second = pool.submit(batchers.predict, "m", "1", np.array([[2.0]]))
        assert (first.result()["predict"], second.result()["predict"]) == ([2.0], [4.0])
    assert model.batches == [2]  # full at 2 rows: it did not wait the whole 5 s


def test_batching_off_calls_the_model_directly() -> None:
    model = RecordingModel()
    model.release.set()
    batchers = batchers_for(model, max_rows=1)
    assert batchers.predict("m", "1", np.array([[3.0]]))["predict"] == [6.0]
    assert batchers._batchers == {}


def test_aimd_grows_while_fast_and_halves_when_slow() -> None:
    policy = BatchPolicy(max_rows=20, adaptive=True, target_s=0.01, step=4)
    batcher = Batcher(("m", "1"), lambda name, version: None, policy, None)  # type: ignore[arg-type,return-value]
    assert batcher.limit == 4
    for expected in (8, 12, 16, 20, 20):
        batcher.adapt(0.005)
        assert batcher.limit == expected
    batcher.adapt(0.02)
    assert batcher.limit == 10
    for _ in range(5):
        batcher.adapt(0.05)
    assert batcher.limit == 1


def test_concurrent_http_requests_are_batched_in_the_worker(
    consumer_factory: Any, serve_model: Any
) -> None:
    consumer_factory(workers=8)
    model = RecordingModel()
    with TestClient(core_app()) as client, ThreadPoolExecutor(8) as pool:
        serve_model("rec", model, n_features=1, client=client)
        post = lambda v: client.post("/v1/models/rec:predict", json={"instances": [[v]]})  # noqa: E731
        first = pool.submit(post, 0.0)
        assert model.started.wait(10)
        rest = [pool.submit(post, float(i)) for i in range(1, 8)]
        wait_for(lambda: core.batchers.get("rec", "1").waiting == 7, "7 tasks")
        model.release.set()
        responses = [first.result(), *(future.result() for future in rest)]
    assert [r.json()["predictions"] for r in responses] == [[2.0 * i] for i in range(8)]
    assert model.batches == [1, 7]


def core_app() -> Any:
    import main

    return main.app
