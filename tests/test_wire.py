"""The contract between API and workers (hueyserve.wire), and the worker's one way to isolate
a bad input (hueyserve.worker.batching.predict_parts), as pure functions."""

from __future__ import annotations

import time

import numpy as np
from huey.api import Task

from hueyserve import wire
from hueyserve.models import Outputs
from hueyserve.worker.batching import predict_parts, split_rows


def test_queue_entries_keep_fifo_order_within_a_priority() -> None:
    first = wire.queue_entry(b"first")
    time.sleep(0.001)
    second = wire.queue_entry(b"second")
    assert first < second  # a ZSET orders equal scores by member bytes: the time prefix
    assert wire.message_of(first) == b"first" and wire.message_of(second) == b"second"
    assert wire.queue_score(90) < wire.queue_score(10) < wire.queue_score(None) == 0


def test_a_task_names_its_jobs_and_its_waiter() -> None:
    alone = Task(args=("m", "1", None), kwargs=wire.predict_options(None), id="j1")
    assert wire.members(alone, rows=3) == [("j1", 3)] and wire.job_ids(alone) == ["j1"]
    assert wire.reply_to(alone) is None
    options = wire.predict_options("hueyserve:results:api", [("a", 2), ("b", 1)])
    group = Task(args=("m", "1", None), kwargs=options, id="a")
    assert wire.members(group) == [("a", 2), ("b", 1)] and wire.job_ids(group) == ["a", "b"]
    assert wire.reply_to(group) == "hueyserve:results:api"


def test_a_wake_up_carries_the_job_id_and_any_payload_bytes() -> None:
    payload = b"\x00 any bytes \xff"
    message = wire.result_message("0b9d-job", payload)
    assert wire.parse_result_message(message) == ("0b9d-job", payload)


def test_keys_derive_from_the_queue_and_huey_names() -> None:
    assert wire.leases_key("q") == "q:leases" and wire.doorbell_key("q") == "q:doorbell"
    assert wire.job_key("j") == "hueyserve:job:j"
    assert wire.revoke_id("j") == Task(id="j").revoke_id


class Model:
    """Doubles each row; fails any call that holds a negative value; counts calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(self, features: np.ndarray) -> Outputs:
        self.calls.append(len(features))
        if (features < 0).any():
            raise ValueError("negative input")
        return {"predict": (features[:, 0] * 2).tolist()}


def test_one_call_answers_every_part_with_its_own_rows() -> None:
    model = Model()
    parts = [np.array([[1.0], [2.0]]), np.array([[3.0]])]
    assert predict_parts(model.predict, parts) == [{"predict": [2.0, 4.0]}, {"predict": [6.0]}]
    assert model.calls == [3]


def test_a_bad_part_is_found_by_halves_and_fails_alone() -> None:
    model = Model()
    parts = [np.array([[float(i)]]) for i in range(8)]
    parts[5] = np.array([[-1.0]])
    answers = predict_parts(model.predict, parts)
    assert [a for i, a in enumerate(answers) if i != 5] == [
        {"predict": [2.0 * i]} for i in range(8) if i != 5
    ]
    assert isinstance(answers[5], ValueError)
    assert model.calls == [8, 4, 4, 2, 1, 1, 2]  # halves: 7 calls, not one per part after 8


def test_no_parts_no_call() -> None:
    model = Model()
    assert predict_parts(model.predict, []) == [] and model.calls == []


def test_outputs_are_cut_back_into_parts() -> None:
    outputs = {"predict": [1, 2, 3], "predict_proba": [[0.1], [0.2], [0.3]]}
    assert split_rows(outputs, [2, 1]) == [
        {"predict": [1, 2], "predict_proba": [[0.1], [0.2]]},
        {"predict": [3], "predict_proba": [[0.3]]},
    ]


def test_only_calls_that_succeeded_are_observed() -> None:
    model = Model()
    calls: list[tuple[int, int]] = []
    parts = [np.array([[1.0]]), np.array([[-1.0], [2.0]]), np.array([[3.0]])]
    predict_parts(model.predict, parts, lambda n, rows, seconds: calls.append((n, rows)))
    assert model.calls == [4, 1, 3, 2, 1]  # the whole, then halves: [p0] ok, [p1, p2]...
    assert calls == [(1, 1), (1, 1)]  # p0 and p2 alone; the three failed calls tell nothing


def test_every_eviction_policy_but_noeviction_is_refused() -> None:
    """Issue 11.3: Redis's own list of `maxmemory-policy` values."""
    evicting = [
        "allkeys-lru", "volatile-lru", "allkeys-lfu", "volatile-lfu",
        "allkeys-random", "volatile-random", "volatile-ttl",
    ]  # fmt: skip
    for policy in evicting:
        problem = wire.eviction_problem(policy)
        assert problem is not None and policy in problem and "noeviction" in problem
    assert wire.eviction_problem("noeviction") is None
    assert wire.eviction_problem(None) is None  # CONFIG refused: cannot tell
