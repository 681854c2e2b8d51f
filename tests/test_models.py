"""Serving the user's own models (issue 12), end to end through the real queue: import by
HTTP, each runtime through v1 and v2 with answers equal to the library's own, text models,
`python` models, refusals that keep the active version serving, deletes, batching."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import onnxruntime
import pytest
import redis
import skops.io
import xgboost
from fastapi.testclient import TestClient
from skl2onnx import to_onnx
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

import core
from hueyserve import wire
from hueyserve.worker.publishing import entries
from tests.helpers import poll_job

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
DIABETES_X, DIABETES_Y = load_diabetes(return_X_y=True)
ROWS = IRIS_X[::10]  # 15 flowers, all three classes
CORPUS = [
    ("a wonderful, delightful film", "pos"),
    ("great acting and a great story", "pos"),
    ("i loved every minute of it", "pos"),
    ("a dull, boring mess", "neg"),
    ("terrible acting and a boring story", "neg"),
    ("i hated every minute of it", "neg"),
]


def upload(
    client: TestClient, name: str, files: dict[str, bytes], metadata: dict[str, Any] | None = None
) -> Any:
    parts = [("file", (file_name, data)) for file_name, data in files.items()]
    if metadata is not None:
        parts.append(("metadata", ("metadata.json", json.dumps(metadata).encode())))
    return client.post(f"/v1/models/{name}/versions", files=parts)


def v2_infer(
    client: TestClient, name: str, rows: np.ndarray, datatype: str, input_name: str
) -> Any:
    body = {"inputs": [{"name": input_name, "shape": list(rows.shape), "datatype": datatype,
                        "data": rows.ravel().tolist()}]}  # fmt: skip
    response = client.post(f"/v2/models/{name}/infer", json=body)
    assert response.status_code == 200, response.text
    return {
        o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in response.json()["outputs"]
    }


@pytest.fixture(scope="module")
def iris_forest() -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(IRIS_X, IRIS_Y)


@pytest.fixture(scope="module")
def onnx_bytes(iris_forest: RandomForestClassifier) -> bytes:
    model = to_onnx(iris_forest, IRIS_X[:1].astype(np.float32), options={"zipmap": False})
    return bytes(model.SerializeToString())


def test_onnx_imported_by_http_answers_as_onnxruntime(
    client: TestClient, onnx_bytes: bytes, iris_forest: RandomForestClassifier
) -> None:
    response = upload(client, "flowers", {"forest.onnx": onnx_bytes}, {"classes": [0, 1, 2]})
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["model_version"], body["active_version"], body["runtime"]) == ("1", "1", "onnx")
    assert body["files"]["model.onnx"]["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert body["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    label, probabilities = session.run(None, {"X": ROWS.astype(np.float32)})
    v2 = v2_infer(client, "flowers", ROWS, "FP32", "X")
    np.testing.assert_array_equal(v2["label"], label)
    np.testing.assert_allclose(v2["probabilities"], probabilities, rtol=1e-6)
    assert v2["label"].tolist() == iris_forest.predict(ROWS).tolist()
    v1 = client.post("/v1/models/flowers:predict", json={"instances": ROWS.tolist()}).json()
    assert [p["label"] for p in v1["predictions"]] == label.tolist()
    metadata = client.get("/v2/models/flowers").json()
    assert metadata["platform"] == "onnx" and metadata["inputs"][0]["name"] == "X"


def test_sklearn_xgboost_lightgbm_answer_as_their_libraries(
    client: TestClient, tmp_path: Path
) -> None:
    forest = RandomForestRegressor(n_estimators=10, random_state=0).fit(DIABETES_X, DIABETES_Y)
    skops.io.dump(forest, tmp_path / "model.skops")
    booster = xgboost.train(
        {"objective": "multi:softprob", "num_class": 3, "nthread": 1},
        xgboost.DMatrix(IRIS_X, label=IRIS_Y),
        num_boost_round=5,
    )
    booster.save_model(tmp_path / "model.ubj")
    gbm = lightgbm.train(
        {"objective": "regression", "verbose": -1, "num_threads": 1},
        lightgbm.Dataset(DIABETES_X, DIABETES_Y),
        num_boost_round=10,
    )
    gbm.save_model(tmp_path / "model.txt")
    cases = [
        ("forest", "model.skops", DIABETES_X[:8], forest.predict(DIABETES_X[:8])),
        ("boosted", "model.ubj", ROWS, booster.predict(xgboost.DMatrix(ROWS))),
        ("gbm", "model.txt", DIABETES_X[:8], gbm.predict(DIABETES_X[:8])),
    ]
    for name, file_name, rows, expected in cases:
        response = upload(client, name, {file_name: (tmp_path / file_name).read_bytes()})
        assert response.status_code == 201, (name, response.text)
        tensor = response.json()["inputs"][0]
        v2 = v2_infer(client, name, rows, tensor["datatype"], tensor["name"])
        np.testing.assert_allclose(v2["predict"], expected, rtol=1e-6)
        v1 = client.post(f"/v1/models/{name}:predict", json={"instances": rows.tolist()})
        np.testing.assert_allclose(v1.json()["predictions"], expected, rtol=1e-6)


def test_a_text_pipeline_takes_strings_and_names_its_input_when_not(
    client: TestClient, tmp_path: Path
) -> None:
    texts, labels = zip(*CORPUS, strict=True)
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, labels)
    skops.io.dump(pipeline, tmp_path / "model.skops")
    response = upload(client, "sentiment", {"model.skops": (tmp_path / "model.skops").read_bytes()})
    assert response.status_code == 201, response.text
    assert response.json()["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    asked = ["what a wonderful story", "boring and dull", "é ✓ unseen words"]
    v1 = client.post("/v1/models/sentiment:predict", json={"instances": asked})
    assert v1.status_code == 200, v1.text
    expected = pipeline.predict_proba(asked)
    for prediction, label, row in zip(
        v1.json()["predictions"], pipeline.predict(asked), expected, strict=True
    ):
        assert prediction["class"] == label
        assert list(prediction["probabilities"]) == ["neg", "pos"]
        np.testing.assert_allclose(list(prediction["probabilities"].values()), row)
    body = {"inputs": [{"name": "text", "shape": [3, 1], "datatype": "BYTES", "data": asked}]}
    v2 = client.post("/v2/models/sentiment/infer", json=body).json()
    assert v2["outputs"][0]["data"] == pipeline.predict(asked).tolist()
    # Triton's binary BYTES layout, as tritonclient sends strings: a length before each.
    raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in asked)
    header = json.dumps({"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                         "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    binary = client.post(
        "/v2/models/sentiment/infer",
        content=header + raw,
        headers={"Inference-Header-Content-Length": str(len(header)),
                 "Content-Type": "application/octet-stream"},
    )  # fmt: skip
    assert binary.status_code == 200, binary.text
    assert binary.json()["outputs"][0]["data"] == pipeline.predict(asked).tolist()
    cut = client.post(
        "/v2/models/sentiment/infer",
        content=header + raw[:-3],
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert cut.status_code == 400 and "binary_data_size" in cut.json()["error"]
    job = client.post("/v1/jobs", json={"model": "sentiment", "instances": asked}).json()
    done = poll_job(client, job["job_id"])
    assert [p["class"] for p in done["result"]["predictions"]] == pipeline.predict(asked).tolist()
    bad_job = client.post("/v1/jobs", json={"model": "sentiment", "instances": ["ok", 3]})
    assert bad_job.status_code == 422 and "instances[1]" in bad_job.json()["error"]
    padded = client.post(  # 0.9 MB of text, but 4.5 M characters once each row is padded
        "/v1/models/sentiment:predict", json={"instances": ["x" * 900_000, *"abcd"]}
    )
    assert padded.status_code == 413 and "requests of their own" in padded.json()["error"]
    numbers = client.post("/v1/models/sentiment:predict", json={"instances": [[1.0, 2.0]]})
    assert numbers.status_code == 422 and "takes text (input 'text')" in numbers.json()["error"]
    body["inputs"][0].update(datatype="FP32", data=[1.0, 2.0, 3.0])
    wrong = client.post("/v2/models/sentiment/infer", json=body)
    assert wrong.status_code == 422 and "input 'text'" in wrong.json()["error"]
    assert "BYTES" in wrong.json()["error"]
    body["inputs"][0].update(datatype="BYTES", data=["fine", 2, "x"])
    mixed = client.post("/v2/models/sentiment/infer", json=body)
    assert mixed.status_code == 422 and "input 'text' holds int" in mixed.json()["error"]


PYTHON_MODEL = """
import numpy as np
from hueyserve.worker.runtimes.sklearn_runtime import SklearnRuntime


class Model(SklearnRuntime):
    \"\"\"A forest trained on centimetres, served to clients who send millimetres.\"\"\"

    def preprocess(self, rows):
        if (rows < 0).any():
            raise ValueError("lengths are never negative")
        return rows / 10

    def postprocess(self, outputs):
        names = np.array(["setosa", "versicolor", "virginica"])
        return {**outputs, "species": names[outputs["predict"]]}
"""


def python_files(forest: RandomForestClassifier, tmp_path: Path) -> dict[str, bytes]:
    skops.io.dump(forest, tmp_path / "model.skops")
    return {
        "model.skops": (tmp_path / "model.skops").read_bytes(),
        "model.py": PYTHON_MODEL.encode(),
    }


def test_a_python_model_is_refused_unless_the_setting_allows_it(
    client: TestClient, iris_forest: RandomForestClassifier, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, redis_conn: redis.Redis,
) -> None:  # fmt: skip
    files = python_files(iris_forest, tmp_path)
    refused = upload(client, "mm", files, {"runtime": "python"})
    assert refused.status_code == 422
    assert "HUEYSERVE_ALLOW_PYTHON_MODELS=true" in refused.json()["error"]
    assert "mm" not in entries(redis_conn)
    monkeypatch.setitem(core.worker.repository.options, "allow_python", True)
    outputs = [
        {"name": "predict", "datatype": "INT64", "shape": [-1]},
        {"name": "predict_proba", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "species", "datatype": "BYTES", "shape": [-1]},
    ]
    metadata = {"runtime": "python", "outputs": outputs, "example": [[51.0, 35.0, 14.0, 2.0]],
                "inputs": [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]}  # fmt: skip
    accepted = upload(client, "mm", files, metadata)
    assert accepted.status_code == 201, accepted.text
    millimetres = (ROWS * 10).tolist()
    response = client.post("/v1/models/mm:predict", json={"instances": millimetres})
    assert response.status_code == 200, response.text
    species = [p["species"] for p in response.json()["predictions"]]
    names = np.array(["setosa", "versicolor", "virginica"])
    assert species == names[iris_forest.predict(ROWS)].tolist()


def test_broken_imports_are_refused_with_the_reason_while_the_active_version_serves(
    client: TestClient, onnx_bytes: bytes, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    assert upload(client, "flowers", {"model.onnx": onnx_bytes}).status_code == 201
    wrong_sha = {"files": {"model.onnx": {"sha256": "0" * 64}}}
    mismatch = {"inputs": [{"name": "X", "datatype": "FP64", "shape": [-1, 5]}]}
    cases = [
        ({"model.onnx": b"not an onnx file"}, None, 422, "onnxruntime could not load"),
        ({"model.onnx": onnx_bytes}, wrong_sha, 422, "SHA-256"),
        ({"model.onnx": onnx_bytes}, mismatch, 422, "signature mismatch"),
        ({"model.onnx": onnx_bytes}, {"example": [[1.0, 2.0]]}, 422, "smoke prediction"),
        ({"model.pkl": b"\x80\x04 pickled"}, None, 422, "skops.io.dump"),
        ({"forest.joblib": b"x"}, {"runtime": "sklearn"}, 422, "pickle (or joblib)"),
        ({"notes.bin": b"x"}, None, 422, "cannot tell the runtime"),
    ]
    for files, metadata, status, reason in cases:
        response = upload(client, "flowers", files, metadata)
        assert response.status_code == status, (reason, response.text)
        assert reason in response.json()["error"], response.text
        served = client.post("/v1/models/flowers:predict", json={"instances": ROWS.tolist()})
        assert served.status_code == 200 and served.headers["X-Model-Version"] == "1"
    assert entries(redis_conn)["flowers"].version_list() == ["1"]


def test_an_import_above_the_size_cap_is_a_413_that_says_what_to_do(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core.settings, "max_artifact_bytes", 1024)  # the API reads it per import
    response = upload(client, "big", {"model.onnx": b"x" * 2048})
    assert response.status_code == 413 and "uri" in response.json()["error"]


def test_an_import_from_a_uri_is_fetched_by_the_worker(
    client: TestClient, onnx_bytes: bytes, tmp_path: Path, redis_conn: redis.Redis
) -> None:
    shared = tmp_path / "shared-mount" / "flowers"
    shared.mkdir(parents=True)
    (shared / "model.onnx").write_bytes(onnx_bytes)
    digest = hashlib.sha256(onnx_bytes).hexdigest()
    metadata = {"uri": shared.as_uri(), "files": {"model.onnx": {"sha256": digest}}}
    response = client.post("/v1/models/flowers/versions", json=metadata)
    assert response.status_code == 201, response.text
    assert not redis_conn.exists(wire.artifact_key(digest))  # not through Redis
    served = client.post("/v1/models/flowers:predict", json={"instances": ROWS.tolist()})
    assert served.status_code == 200, served.text


def test_versions_and_models_are_deleted_and_their_artifacts_freed(
    client: TestClient, onnx_bytes: bytes, redis_conn: redis.Redis, tmp_path: Path
) -> None:
    demos = set(redis_conn.scan_iter(match=wire.artifact_key("*")))
    assert upload(client, "flowers", {"model.onnx": onnx_bytes}).status_code == 201
    other = RandomForestClassifier(n_estimators=3, random_state=1).fit(IRIS_X, IRIS_Y)
    second = to_onnx(other, IRIS_X[:1].astype(np.float32), options={"zipmap": False})
    assert upload(client, "flowers", {"model.onnx": second.SerializeToString()}).status_code == 201
    assert len(set(redis_conn.scan_iter(match=wire.artifact_key("*"))) - demos) == 2
    active = client.delete("/v1/models/flowers/versions/2")
    assert active.status_code == 409 and "is active" in active.json()["error"]
    gone = client.delete("/v1/models/flowers/versions/1")
    assert gone.status_code == 200, gone.text
    assert gone.json()["versions"] == ["2"]
    assert len(set(redis_conn.scan_iter(match=wire.artifact_key("*"))) - demos) == 1
    assert (
        client.post(
            "/v1/models/flowers/versions/1:predict", json={"instances": [[1, 2, 3, 4]]}
        ).status_code
        == 404
    )
    assert client.delete("/v1/models/flowers").status_code == 200
    assert client.get("/v1/models/flowers").status_code == 404
    assert set(redis_conn.scan_iter(match=wire.artifact_key("*"))) == demos
    assert client.delete("/v1/models/flowers").status_code == 404
    for name in ("diabetes", "iris"):  # the last ones too: gone, not "Redis lost its data"
        assert client.delete(f"/v1/models/{name}").status_code == 200
    assert client.get("/v1/models").json() == {"models": []}
    time.sleep(1.5)  # past a full reread of the catalog (HUEYSERVE_CATALOG_RESYNC_S=1)
    assert client.get("/v1/models").json() == {"models": []}
    assert not set(redis_conn.scan_iter(match=wire.artifact_key("*")))


SLOW_MODEL = """
import time
import numpy as np
from hueyserve.worker.runtimes.base import Runtime, Signature, Tensor


class Model(Runtime):
    def load(self):
        return Signature((Tensor("x", "FP64", (-1, 1)),), (Tensor("double", "FP64", (-1,)),))

    def preprocess(self, rows):
        if rows[0, 0] < 0:
            raise ValueError("negative input")
        return rows

    def predict(self, batch):
        with open(self.folder.parent.parent / "calls.log", "a") as log:
            log.write(f"{len(batch)}\\n")
        time.sleep(0.3)
        return {"double": batch[:, 0] * 2}
"""


def test_concurrent_requests_share_one_model_call_and_a_bad_one_fails_alone(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, model_store: Any
) -> None:
    monkeypatch.setitem(core.worker.repository.options, "allow_python", True)
    response = upload(client, "slow", {"model.py": SLOW_MODEL.encode()}, {"example": [[1.0]]})
    assert response.status_code == 201, response.text
    log = model_store.root / "calls.log"
    log.unlink()  # the import's smoke prediction

    def ask(value: float) -> Any:
        return client.post("/v1/models/slow:predict", json={"instances": [[value]]})

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, [1.0, 2.0, 3.0, -1.0, 5.0, 6.0, 7.0, 8.0]))
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == 7 and statuses[3] != 200, statuses
    assert "negative input" in answers[3].json()["error"]
    assert [a.json()["predictions"] for a in answers if a.status_code == 200] == [
        [2.0], [4.0], [6.0], [10.0], [12.0], [14.0], [16.0]
    ]  # fmt: skip
    calls = [int(line) for line in log.read_text().split()]
    assert sum(calls) == 7 and len(calls) < 7, calls  # rows of several requests per call
