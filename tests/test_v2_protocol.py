"""Open Inference Protocol v2 and KServe v1 model routes over plain HTTP (what curl sends),
against the real app and in-process workers. tests/test_e2e.py drives the same routes with
tritonclient, the standard v2 client, against real processes."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.models import ModelVersion
from hueyserve.worker.store import ModelStore
from tests.helpers import poll_job

IRIS_ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
INFER = "/v2/models/diabetes/infer"


def features(rows: list[list[float]], **extra: Any) -> dict[str, Any]:
    shape = [len(rows), len(rows[0])]
    return {"name": "features", "shape": shape, "datatype": "FP64", "data": rows, **extra}


def test_server_and_model_metadata(client: TestClient) -> None:
    server = client.get("/v2").json()
    assert server["name"] == "hueyserve" and "binary_tensor_data" in server["extensions"]
    meta = client.get("/v2/models/iris").json()
    assert meta["name"] == "iris" and meta["versions"] == ["1"] and meta["platform"] == "sklearn"
    assert meta["inputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]
    assert meta["outputs"] == [
        {"name": "predict", "datatype": "BYTES", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]},
    ]
    assert meta["parameters"]["classes"] == ["setosa", "versicolor", "virginica"]
    assert client.get("/v2/models/diabetes/versions/1").json()["parameters"]["active"] is True
    assert client.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert client.get("/v2/models/iris/versions/1/ready").status_code == 200
    assert client.get("/v2/models/iris/versions/7/ready").status_code == 404


def test_v1_lists_models_and_their_readiness(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {"models": ["diabetes", "iris"]}
    status = client.get("/v1/models/iris").json()
    assert status == {"name": "iris", "ready": True, "active_version": "1", "versions": ["1"]}
    assert client.get("/v1/models/nope").status_code == 404


def test_v2_json_infer_matches_the_model(client: TestClient, model_store: ModelStore) -> None:
    body = {"id": "req-7", "inputs": [features(EXAMPLE_ROWS)]}
    response = client.post(INFER, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["id"] == "req-7"
    assert (answer["model_name"], answer["model_version"]) == ("diabetes", "1")
    expected = model_store.load("diabetes", "1").predict(np.array(EXAMPLE_ROWS)).tolist()
    assert answer["outputs"] == [
        {"name": "predict", "shape": [2], "datatype": "FP64", "data": expected}
    ]
    # flat row-major data means the same; the answer now comes from the API's cache
    flat = features(EXAMPLE_ROWS, data=[v for row in EXAMPLE_ROWS for v in row])
    again = client.post("/v2/models/diabetes/versions/1/infer", json={"inputs": [flat]})
    assert again.headers["X-Cache"] == "hit" and again.json()["outputs"][0]["data"] == expected


def test_classifier_answers_class_and_probabilities(
    client: TestClient, model_store: ModelStore
) -> None:
    iris = model_store.load("iris", "1")
    labels = iris.predict(np.array(IRIS_ROWS)).tolist()
    probabilities = iris.predict_proba(np.array(IRIS_ROWS))
    v1 = client.post("/v1/models/iris:predict", json={"instances": IRIS_ROWS}).json()
    assert [p["class"] for p in v1["predictions"]] == labels == ["setosa", "virginica"]
    first = v1["predictions"][0]["probabilities"]
    assert list(first) == ["setosa", "versicolor", "virginica"]
    assert list(first.values()) == probabilities[0].tolist()
    body = {"inputs": [features(IRIS_ROWS)], "outputs": [{"name": "predict_proba"}]}
    v2 = client.post("/v2/models/iris/infer", json=body).json()
    (tensor,) = v2["outputs"]
    assert tensor["name"] == "predict_proba" and tensor["shape"] == [2, 3]
    assert tensor["data"] == probabilities.ravel().tolist()


def test_binary_tensors_in_and_out(client: TestClient, model_store: ModelStore) -> None:
    rows = np.array(IRIS_ROWS, dtype=np.float32)
    raw = rows.astype("<f4").tobytes()
    tensor: dict[str, Any] = {"name": "features", "shape": [2, 4], "datatype": "FP32"}
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    response = client.post(
        "/v2/models/iris/infer",
        content=header + raw,
        headers={
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
    )
    assert response.status_code == 200, response.text
    split = int(response.headers["Inference-Header-Content-Length"])
    answer = json.loads(response.content[:split])
    sizes = [o["parameters"]["binary_data_size"] for o in answer["outputs"]]
    blob = response.content[split:]
    assert len(blob) == sum(sizes) and all("data" not in o for o in answer["outputs"])
    labels, offset = [], 0
    while offset < sizes[0]:  # BYTES: 4-byte little-endian length, then the bytes
        (length,) = struct.unpack_from("<I", blob, offset)
        labels.append(blob[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    probabilities = np.frombuffer(blob[sizes[0] :], dtype="<f8").reshape(2, 3)
    iris = model_store.load("iris", "1")
    assert labels == iris.predict(rows.astype(np.float64)).tolist()
    assert np.allclose(probabilities, iris.predict_proba(rows.astype(np.float64)))


def test_async_v2_job_reads_back_in_v2_form(client: TestClient) -> None:
    accepted = client.post(
        INFER, json={"inputs": [features(EXAMPLE_ROWS)]}, headers={"Prefer": "respond-async"}
    )
    assert accepted.status_code == 202
    job = poll_job(client, accepted.json()["job_id"])
    assert job["result"]["model_name"] == "diabetes"
    assert job["result"]["outputs"][0]["shape"] == [2]


def test_schedule_policy_parameters(client: TestClient) -> None:
    body = {"inputs": [features(EXAMPLE_ROWS)], "parameters": {"priority": 1, "timeout": 5_000_000}}
    response = client.post(INFER, json=body, headers={"Prefer": "respond-async"})
    assert response.status_code == 202
    assert client.get(response.headers["Location"]).json()["priority"] == 100


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"inputs": []}, 422, "inputs"),
        ({"inputs": [features(EXAMPLE_ROWS, name="x")]}, 422, "no input 'x'"),
        ({"inputs": [features(EXAMPLE_ROWS, datatype="BYTES")]}, 422, "not a number type"),
        ({"inputs": [features(EXAMPLE_ROWS, shape=[2, 5])]}, 422, "takes [rows, 10]"),
        ({"inputs": [features(EXAMPLE_ROWS, shape=[20])]}, 422, "takes [rows, 10]"),
        ({"inputs": [features([[1.0, 2.0]])]}, 422, "takes [rows, 10]"),
        ({"inputs": [features(EXAMPLE_ROWS, shape=[1, 10])]}, 422, "needs 10"),
        ({"inputs": [features(EXAMPLE_ROWS, shape=[2**62, 10])]}, 413, "split the request"),
        ({"inputs": [features(EXAMPLE_ROWS)], "outputs": []}, 422, "outputs"),
        ({"inputs": [features(EXAMPLE_ROWS, data=[["a"] * 10] * 2)]}, 422, "only numbers"),
        ({"inputs": [features(EXAMPLE_ROWS, data=[[1.0], [1.0, 2.0]])]}, 422, "regular"),
        ({"inputs": [features(EXAMPLE_ROWS, data=None)]}, 422, "no data"),
        ({"inputs": [features([[1e300] * 10])]}, 422, "beyond"),
        ({"inputs": [features(EXAMPLE_ROWS)], "outputs": [{"name": "y"}]}, 422, "no output 'y'"),
        ({"inputs": [features(EXAMPLE_ROWS)], "parameters": {"priority": -1}}, 422, "Triton"),
        ({"inputs": [features(EXAMPLE_ROWS)], "parameters": {"timeout": 0.5}}, 422, "micro"),
    ],
)
def test_v2_bad_input_gets_clear_4xx(
    client: TestClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = client.post(INFER, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_v2_malformed_bodies(client: TestClient) -> None:
    length = b"Inference-Header-Content-Length"
    cases: list[tuple[bytes, dict[bytes, bytes], int, str]] = [
        (b'{"inputs": [', {}, 400, "malformed JSON"),
        (b'{"inputs": []}', {length: b"99"}, 400, "not a length"),
        (b'{"inputs": []}', {length: b"\xb2"}, 400, "not a length"),  # a digit, not ASCII
        (b'{"inputs": [{"name": "features", "shape": [1, 10], "datatype": "FP64", '
         b'"parameters": {"binary_data_size": 80}}]}', {}, 400, "binary_data_size"),
    ]  # fmt: skip
    for content, headers, status, fragment in cases:
        response = client.post(INFER, content=content, headers=headers)
        assert response.status_code == status, response.text
        assert fragment in response.json()["error"]
    body = {"inputs": [features(EXAMPLE_ROWS)]}
    missing = client.post("/v2/models/diabetes/versions/9/infer", json=body)
    assert missing.status_code == 404 and "versions: 1" in missing.json()["error"]


def test_classifier_saved_without_a_signature_is_described_from_its_classes() -> None:
    metadata = {"task": "classification", "classes": ["a", "b"], "n_features": 2}
    model = ModelVersion("custom", "1", metadata)
    assert model.inputs == [{"name": "features", "datatype": "FP64", "shape": [-1, 2]}]
    assert [(o["name"], o["datatype"]) for o in model.outputs] == [
        ("predict", "BYTES"),
        ("predict_proba", "FP64"),
    ]
    numbered = ModelVersion("custom", "1", {**metadata, "classes": [0, 1]})
    assert numbered.outputs[0]["datatype"] == "INT64"
