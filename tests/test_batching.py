"""Dynamic batching in a worker: concurrent tasks of one model version share predict calls."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2 as httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

import core
import main
from hueyserve import models
from hueyserve.api.grouping import MAX_HOLD_S, Grouper, GroupKey, Member, SendGroup
from hueyserve.api.services import Services
from hueyserve.worker import publishing
from hueyserve.worker.batching import Batcher, Batchers, BatchPolicy
from hueyserve.worker.registry import LoadedModel
from tests.helpers import services_of, wait_for


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
    loaded = LoadedModel.from_estimator("m", "1", model, {"n_features": 1})
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
    with TestClient(main.app) as client, ThreadPoolExecutor(8) as pool:
        serve_model("rec", model, n_features=1, client=client)
        # Every request its own task at once, so the worker has tasks to batch; the API's
        # grouping of requests has tests of its own below.
        services_of(client).inference.grouper.max_in_flight = 0
        post = lambda v: client.post("/v1/models/rec:predict", json={"instances": [[v]]})  # noqa: E731
        first = pool.submit(post, 0.0)
        assert model.started.wait(10)
        rest = [pool.submit(post, float(i)) for i in range(1, 8)]
        wait_for(lambda: core.worker.predictor.batchers.get("rec", "1").rows_waiting == 7, "7 rows")
        model.release.set()
        responses = [first.result(), *(future.result() for future in rest)]
    assert [r.json()["predictions"] for r in responses] == [[2.0 * i] for i in range(8)]
    assert model.batches == [1, 7]


# --- the API side: sync misses that arrive together travel as one task ----------------------


def test_requests_of_one_turn_form_one_group_per_key() -> None:
    sent: list[tuple[GroupKey, list[str]]] = []

    async def send(key: GroupKey, members: list[Member]) -> None:
        sent.append((key, [m.job_id for m in members]))

    async def scenario() -> None:
        grouper = Grouper(send, max_rows=4, max_in_flight=0)
        rows = np.zeros((1, 1))
        same_turn = [grouper.add(("m", "1", 10), f"a{i}", rows) for i in range(3)]
        same_turn.append(grouper.add(("m", "1", 90), "urgent", rows))  # another priority
        same_turn.append(grouper.add(("m", "2", 10), "v2", rows))  # another version
        same_turn += [grouper.add(("m", "1", 10), f"b{i}", rows) for i in range(3)]  # > 4 rows
        await asyncio.gather(*(member.enqueued for member in same_turn))
        await grouper.add(("m", "1", 10), "later", rows).enqueued  # alone: sent by itself

    asyncio.run(scenario())
    assert sent == [
        (("m", "1", 10), ["a0", "a1", "a2", "b0"]),  # full: sent at once
        (("m", "1", 90), ["urgent"]),
        (("m", "2", 10), ["v2"]),
        (("m", "1", 10), ["b1", "b2"]),
        (("m", "1", 10), ["later"]),
    ]


def test_a_failed_enqueue_fails_every_request_of_the_group() -> None:
    async def send(key: GroupKey, members: list[Member]) -> None:
        raise ConnectionError("Redis is down")

    async def scenario() -> list[Any]:
        grouper = Grouper(send, max_rows=16, max_in_flight=0)
        members = [grouper.add(("m", "1", 10), str(i), np.zeros((1, 1))) for i in range(3)]
        return await asyncio.gather(*(m.enqueued for m in members), return_exceptions=True)

    assert [type(e) for e in asyncio.run(scenario())] == [ConnectionError] * 3


def recorder() -> tuple[list[list[str]], SendGroup]:
    """A `send` that records the job ids of each group it is given."""
    sent: list[list[str]] = []

    async def send(key: GroupKey, members: list[Member]) -> None:
        sent.append([m.job_id for m in members])

    return sent, send


def test_while_groups_await_answers_new_requests_join_the_next_group() -> None:
    sent, send = recorder()

    async def scenario() -> None:
        grouper = Grouper(send, max_rows=3, max_in_flight=1)
        rows = np.zeros((1, 1))
        first = grouper.add(("m", "1", 10), "first", rows)
        await first.enqueued
        later = []
        for i in range(4):  # one per turn: without the limit, each would be a task
            later.append(grouper.add(("m", "1", 10), f"later{i}", rows))
            await asyncio.sleep(0)
        assert sent == [["first"], ["later0", "later1", "later2"]]  # full: sent anyway
        grouper.answered(first)  # frees the key: what joined meanwhile goes now
        await later[3].enqueued

    asyncio.run(scenario())
    assert sent[-1] == ["later3"]


def test_a_held_group_goes_after_at_most_the_hold_limit() -> None:
    """A group in flight that never gets answered (a lost task) holds the next one back for
    MAX_HOLD_S, not for the whole predict timeout."""
    sent, send = recorder()

    async def scenario() -> float:
        grouper = Grouper(send, max_rows=64, max_in_flight=1)
        rows = np.zeros((1, 1))
        await grouper.add(("m", "1", 10), "lost", rows).enqueued  # never answered
        started = time.monotonic()
        await grouper.add(("m", "1", 10), "held", rows).enqueued
        return time.monotonic() - started

    held_s = asyncio.run(scenario())
    assert sent == [["lost"], ["held"]]
    assert MAX_HOLD_S * 0.9 <= held_s < MAX_HOLD_S + 0.5


def test_a_request_that_gives_up_leaves_its_group_and_nothing_waits_forever() -> None:
    sent: list[list[str]] = []

    async def send(key: GroupKey, members: list[Member]) -> None:
        await asyncio.sleep(0)  # the enqueue takes a turn or more
        sent.append([m.job_id for m in members])

    async def scenario() -> None:
        grouper = Grouper(send, max_rows=64, max_in_flight=1)
        rows = np.zeros((1, 1))
        first = grouper.add(("m", "1", 10), "first", rows)
        await first.enqueued
        quitter, stayer = (grouper.add(("m", "1", 10), name, rows) for name in ("q", "s"))
        quitter.enqueued.cancel()  # its request was cancelled while the group was held
        grouper.answered(quitter)
        later = grouper.add(("m", "1", 10), "x", rows)
        grouper.answered(first)  # frees the key: the held group goes, without the quitter
        await stayer.enqueued
        assert later.group is stayer.group
        await later.enqueued

    asyncio.run(scenario())
    assert sent == [["first"], ["s", "x"]]


def test_a_group_is_one_task_and_each_request_keeps_its_own_job(
    consumer_factory: Any, redis_conn: redis.Redis
) -> None:
    """Concurrent requests through the real app: one task, one model call, and each request
    its own answer and job record; a bad row fails only its own request."""
    consumer_factory(workers=2)
    model = RecordingModel()
    model.release.set()
    metadata = {"n_features": 1, "features": ["x0"]}
    core.worker.registry.register(LoadedModel.from_estimator("group", "1", model, metadata))
    publishing.publish(redis_conn, models.ModelEntry("group", "1", {"1": metadata}))

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], int]:
        async with main.app.router.lifespan_context(main.app):
            service: Services = main.app.state.services
            async with asyncio.timeout(10):
                while "group" not in service.catalog.models:
                    await asyncio.sleep(0.02)
            transport = httpx.ASGITransport(app=main.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
                enqueued = service.queue.enqueued
                values = [1.0, 2.0, 3.0, -1.0, 4.0]
                answers = await asyncio.gather(
                    *(
                        http.post("/v1/models/group:predict", json={"instances": [[v]]})
                        for v in values
                    )
                )
                tasks = service.queue.enqueued - enqueued
                jobs = [await http.get(f"/v1/jobs/{r.headers['X-Job-Id']}") for r in answers]
        return answers, jobs, tasks

    try:
        answers, jobs, tasks = asyncio.run(scenario())
    finally:
        core.worker.registry.unregister("group")
    assert tasks == 1
    # The group's rows in one call; it failed (-1), so halves until the bad row is alone.
    assert model.batches == [5, 2, 3, 1, 2, 1, 1]
    assert [r.status_code for r in answers] == [200, 200, 200, 500, 200]
    ok = [0, 1, 2, 4]
    assert [answers[i].json()["predictions"] for i in ok] == [[2.0], [4.0], [6.0], [8.0]]
    assert "negative input" in answers[3].json()["error"]
    assert len({r.headers["X-Job-Id"] for r in answers}) == 5
    assert [jobs[i].json()["result"] for i in ok] == [{"predictions": [v]} for v in (2, 4, 6, 8)]
    assert all(jobs[i].json()["instances"] == 1 for i in ok)
    assert jobs[3].json()["status"] == "failed"
    assert "negative input" in jobs[3].json()["error"]
