"""What travels through Redis is JSON that reads back as the types Huey and hueyserve wrote,
signed when there is a secret; anything else is refused (hueyserve.serializer)."""

from __future__ import annotations

import datetime
import math
import pickle
from typing import Any

import numpy as np
import pytest
from huey.registry import Message
from huey.utils import Error

from hueyserve.serializer import TAG, JsonSerializer, UnreadablePayload
from hueyserve.training import TrainPlan

VALUES: list[Any] = [
    None,
    {"predict": [1.5, 2.0], "proba": [[0.1, 0.9]]},
    (None, True),
    {1: "an int key", TAG: "a key like the tag"},
    [10**30, -(10**25), 2**63 - 1],
    Error({"error": "boom", "retries": 0}),
    datetime.datetime(2026, 11, 30, 12, 0, 0, 123456),
    datetime.timedelta(seconds=90.5),
    TrainPlan("iris", "LogisticRegression", {"C": 0.5}, "species", 0.25, 3),
    {"metrics": {"r2": float("inf"), "mae": -float("inf")}},
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("secret", [None, "s3cret"])
def test_what_huey_and_hueyserve_store_reads_back_the_same(value: Any, secret: str | None) -> None:
    codec = JsonSerializer(secret)
    assert codec.deserialize(codec.serialize(value)) == value


def test_a_task_message_keeps_its_arrays_exact_and_writable() -> None:
    features = np.array([[0.1, np.nan, -np.inf], [1e-300, 2.5, 3.0]])
    eta = datetime.datetime(2026, 11, 30, 12, 0)
    message = Message("job-1", "core.predict", eta, 2, 1, 50, ("m", "1", features), {"x": 1})
    codec = JsonSerializer()
    read = codec.deserialize(codec.serialize(message))
    assert isinstance(read, Message) and read.id == "job-1" and read.eta == eta
    np.testing.assert_array_equal(read.args[2], features)
    assert read.args[2].dtype == features.dtype and read.args[2].flags.writeable
    assert np.float32(1.5) == codec.deserialize(codec.serialize(np.float32(1.5)))


@pytest.mark.parametrize(
    "payload",
    [
        pickle.dumps({"a": 1}),
        b"not json",
        b'{"$t": "module", "v": "os"}',
        b'{"$t": "array", "v": ["|O", [1], "AAAAAAAAAAA="]}',
        b'{"$t": "plan", "v": {"dataset": "iris", "estimator": "x", "params": {}, "evil": 1}}',
        b'{"$t": "message", "v": []}',
    ],
)
def test_anything_else_is_refused(payload: bytes) -> None:
    with pytest.raises(UnreadablePayload):
        JsonSerializer().deserialize(payload)


def test_what_cannot_travel_fails_where_it_is_written() -> None:
    with pytest.raises(TypeError, match="cannot travel"):
        JsonSerializer().serialize({"x": object()})
    with pytest.raises(TypeError, match="numbers or text"):
        JsonSerializer().serialize(np.array(["text"], dtype=object))


def test_text_rows_travel_as_fixed_width_text() -> None:
    rows = np.array(["a good film", "é ✓", ""])
    back = JsonSerializer("s").deserialize(JsonSerializer("s").serialize({"rows": rows}))["rows"]
    assert back.dtype == rows.dtype and back.tolist() == rows.tolist()


def test_with_a_secret_only_signed_payloads_of_the_same_secret_read() -> None:
    signed = JsonSerializer("one").serialize({"a": 1})
    assert b'"a"' in signed  # signed, not encrypted: the secret protects against forgery only
    for reader, payload in [
        (JsonSerializer("two"), signed),
        (JsonSerializer("one"), JsonSerializer().serialize({"a": 1})),
        (JsonSerializer("one"), signed.replace(b'"a":1', b'"a":2')),
    ]:
        with pytest.raises(UnreadablePayload):
            reader.deserialize(payload)


def test_a_result_reads_only_as_the_job_it_was_stored_for() -> None:
    codec = JsonSerializer("s")
    stored = codec.dump_result("job-a", {"predict": [1.0]})
    assert codec.load_result("job-a", stored) == {"predict": [1.0]}
    with pytest.raises(UnreadablePayload, match="job-b"):
        codec.load_result("job-b", stored)
    with pytest.raises(UnreadablePayload):
        codec.load_result("job-a", codec.serialize({"predict": [1.0]}))  # not bound at all


def test_nan_and_numpy_string_keys_travel_as_plain_values() -> None:
    codec = JsonSerializer()
    read = codec.deserialize(codec.serialize({np.str_("label"): [float("nan")]}))
    assert list(read) == ["label"] and math.isnan(read["label"][0])
