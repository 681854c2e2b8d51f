"""Pure functions of the API process, tested without HTTP: the v1 and v2 codecs, input
checks, validation messages, the route table's access rules, the answer cache's filters and
how a job reads."""

from __future__ import annotations

import re
import struct
from typing import Any

import numpy as np
import pytest
from huey.constants import EmptyData
from huey.utils import Error

from hueyserve.api import paths, v2
from hueyserve.api.answers import _plain_json
from hueyserve.api.inputs import check_features
from hueyserve.api.jobs import job_public
from hueyserve.api.v1 import decode_instances, encode_predictions
from hueyserve.api.validation import location, validation_failure
from hueyserve.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from hueyserve.models import ModelEntry, ModelVersion

REGRESSOR = ModelVersion("m", "1", {"n_features": 2, "features": ["a", "b"]})
CLASSIFIER = ModelVersion(
    "c", "3", {"n_features": 2, "task": "classification", "classes": ["no", "yes"]}
)


class Catalog:
    """Stands in for the API's catalog: `get` by name and version."""

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        return ModelEntry("c", "3", {"3": CLASSIFIER.metadata}).get(version)


# --- inputs and the v1 codec ------------------------------------------------------------------


def test_v1_instances_become_a_checked_float_array() -> None:
    features = decode_instances(REGRESSOR, [[1, 2.5], [3, 4]], max_rows=10)
    assert features.dtype == np.float64 and features.tolist() == [[1.0, 2.5], [3.0, 4.0]]


@pytest.mark.parametrize(
    ("instances", "error", "fragment"),
    [
        ([[1.0]], InvalidInput, "instances[0] has 1 features; model 'm' expects 2 features per"),
        ([], InvalidInput, "no instances"),
        ([[1.0, 2.0]] * 3, PayloadTooLarge, "3 instances in one request; the limit is 2"),
        ([[1.0, 1e39]], InvalidInput, "beyond ±3.4e+38"),
    ],
)  # fmt: skip
def test_v1_instances_that_cannot_be_served_say_why(
    instances: list[list[float]], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=re.escape(fragment)):
        decode_instances(REGRESSOR, instances, max_rows=2)


def test_nan_is_refused_whatever_the_protocol() -> None:
    with pytest.raises(InvalidInput, match="NaN and Infinity"):
        check_features(REGRESSOR, np.array([[np.nan, 1.0]]), max_rows=5)
    with pytest.raises(InvalidInput, match=r"got shape \[2\]"):
        check_features(REGRESSOR, np.array([1.0, 2.0]), max_rows=5)


def test_v1_predictions_of_a_regressor_and_a_classifier() -> None:
    assert encode_predictions(REGRESSOR, {"predict": [1.5, 2.5]}) == [1.5, 2.5]
    answer = {"predict": ["yes"], "predict_proba": [[0.25, 0.75]]}
    assert encode_predictions(CLASSIFIER, answer) == [
        {"class": "yes", "probabilities": {"no": 0.25, "yes": 0.75}}
    ]


# --- validation messages ----------------------------------------------------------------------


def test_locations_read_like_the_body() -> None:
    assert location(("body", "instances", 0, 9)) == "instances[0][9]"
    assert location(("body", "parameters", "timeout")) == "parameters.timeout"
    assert location(()) == ""


def test_validation_failures_name_the_field_and_echo_nothing() -> None:
    problems = [
        {"loc": ("body", "instances", 0, 1), "msg": "Input should be a finite number",
         "type": "finite_number", "input": float("nan")},
    ]  # fmt: skip
    failure = validation_failure(problems, "application/json")
    assert failure.status_code == 422
    assert failure.message == (
        "instances[0][1]: Input should be a finite number (NaN and Infinity are not allowed)"
    )
    malformed = validation_failure([{"type": "json_invalid", "ctx": {"error": "x"}}], None)
    assert malformed.status_code == 400 and "malformed JSON body: x" in malformed.message
    with pytest.raises(UnsupportedMediaType):
        validation_failure([{"loc": ("body",), "msg": "", "type": "missing"}], "text/plain")


# --- the v2 codec -----------------------------------------------------------------------------


def infer_request(**tensor: Any) -> v2.InferenceRequest:
    fields = {"name": "features", "datatype": "FP32", "shape": [1, 2], **tensor}
    return v2.InferenceRequest.model_validate({"inputs": [fields]})


def test_v2_json_and_binary_tensors_decode_to_the_same_rows() -> None:
    json_rows = v2.decode_features(infer_request(data=[[1.5, 2.0]]), b"", REGRESSOR, max_rows=5)
    raw = struct.pack("<2f", 1.5, 2.0)
    binary = infer_request(parameters={"binary_data_size": len(raw)})
    binary_rows = v2.decode_features(binary, raw, REGRESSOR, max_rows=5)
    assert json_rows.tolist() == binary_rows.tolist() == [[1.5, 2.0]]


def test_v2_shape_is_checked_before_any_data_is_decoded() -> None:
    huge = infer_request(shape=[2**62, 2], parameters={"binary_data_size": 8})
    with pytest.raises(PayloadTooLarge, match="HUEYSERVE_MAX_INSTANCES"):
        v2.decode_features(huge, b"\0" * 8, REGRESSOR, max_rows=5)
    with pytest.raises(InvalidInput, match=r"takes \[rows, 2\]"):
        v2.decode_features(infer_request(shape=[1, 3], data=[1, 2, 3]), b"", REGRESSOR, max_rows=5)


def test_triton_schedule_policy_in_hueyserve_terms() -> None:
    assert v2.schedule(None) == v2.Schedule(priority=None, timeout_s=None)
    assert v2.schedule({"priority": 1, "timeout": 250_000}) == v2.Schedule(100, 0.25)
    assert v2.schedule({"priority": 100}).priority == 1
    for bad in ({"priority": -1}, {"priority": True}, {"timeout": 0}, {"timeout": 1.5}):
        with pytest.raises(InvalidInput, match="parameters"):
            v2.schedule(bad)


def test_a_v2_header_length_must_lie_within_the_body() -> None:
    body = b'{"inputs": [{"name": "features", "datatype": "FP32", "shape": [1, 2]}]}'
    request, binary = v2.parse_request(body + b"tail", str(len(body)))
    assert request.inputs[0].shape == [1, 2] and binary == b"tail"
    for header in ("99", "-1", "٣"):
        with pytest.raises(Exception, match="Inference-Header-Content-Length"):
            v2.parse_request(body, header)


# --- the route table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "needed"),
    [
        ("/health", paths.Access.OPEN),
        ("/v2", paths.Access.OPEN),
        ("/v2/health/ready", paths.Access.OPEN),
        ("/docs/oauth2-redirect", paths.Access.OPEN),
        ("/openapi.json", paths.Access.OPEN),
        ("/v1/models/iris/train", paths.Access.ADMIN),
        ("/v1/models/any name at all/reload", paths.Access.ADMIN),
        ("/v1/queue/purge", paths.Access.ADMIN),
        ("/v1/models/iris:predict", paths.Access.PREDICT),
        ("/v2/models/iris", paths.Access.PREDICT),
        ("/v2/healthy", paths.Access.PREDICT),
        ("/v1/models/a/b/train", paths.Access.PREDICT),
        ("/nowhere", paths.Access.PREDICT),
    ],
)
def test_every_path_needs_the_access_its_route_table_entry_says(
    path: str, needed: paths.Access
) -> None:
    assert paths.access(path) is needed


# --- the answer cache's filter ----------------------------------------------------------------


def test_only_plain_sync_json_requests_are_answered_from_the_answer_cache() -> None:
    assert _plain_json([(b"content-type", b"application/json; charset=utf-8")])
    assert _plain_json([])  # no content type: parsed as JSON by the route too
    assert not _plain_json([(b"content-type", b"text/plain")])
    assert not _plain_json([(b"prefer", b"respond-async")])
    assert not _plain_json([(b"content-encoding", b"gzip")])


# --- how a job reads --------------------------------------------------------------------------


def test_the_stored_result_decides_done_or_failed() -> None:
    record = {"status": "running", "kind": "predict", "model": "c", "version": "3",
              "created_at": "1700000000.5", "attempts": "1"}  # fmt: skip
    answer = {"predict": ["yes"], "predict_proba": [[0.25, 0.75]]}
    done = job_public("j", record, answer, Catalog())  # type: ignore[arg-type]
    assert done.status == "done" and done.attempts == 1
    assert done.result == {"predictions": encode_predictions(CLASSIFIER, answer)}
    assert done.created_at is not None and done.created_at.timestamp() == 1700000000.5
    failed = job_public("j", record, Error({"error": "boom"}), Catalog())  # type: ignore[arg-type]
    assert failed.status == "failed" and failed.error == "boom" and failed.result is None


def test_a_done_record_without_its_result_is_still_running() -> None:
    record = {"status": "done", "kind": "predict", "model": "c", "version": "3"}
    job = job_public("j", record, EmptyData, Catalog())  # type: ignore[arg-type]
    assert job.status == "running" and job.finished_at is None


def test_a_v2_job_answers_in_v2() -> None:
    record = {"status": "done", "kind": "predict", "model": "c", "version": "3", "protocol": "v2"}
    answer = {"predict": ["yes"], "predict_proba": [[0.25, 0.75]]}
    result = job_public("j", record, answer, Catalog()).result  # type: ignore[arg-type]
    assert result is not None and [o["name"] for o in result["outputs"]] == [
        "predict",
        "predict_proba",
    ]
