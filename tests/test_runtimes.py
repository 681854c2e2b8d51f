"""The built-in runtimes load real models, trained here and saved in each library's own format,
and answer what the library answers in-process."""

from __future__ import annotations

import operator
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lightgbm
import numpy as np
import pytest
import skops.io
import xgboost
from onnxruntime import InferenceSession, SessionOptions
from skl2onnx import to_onnx
from skl2onnx.common.data_types import StringTensorType
from sklearn.datasets import load_diabetes, load_iris
from sklearn.ensemble import RandomForestClassifier, RandomForestRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from hueyserve.worker.runtimes import PYTHON_REFUSED, load_runtime
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature, Tensor

IRIS_X, IRIS_Y = load_iris(return_X_y=True)
DIABETES_X, DIABETES_Y = load_diabetes(return_X_y=True)

CORPUS = [
    ("a wonderful, delightful film", "pos"),
    ("great acting and a great story", "pos"),
    ("i loved every minute of it", "pos"),
    ("delightful and wonderful fun", "pos"),
    ("a dull, boring mess", "neg"),
    ("terrible acting and a boring story", "neg"),
    ("i hated every minute of it", "neg"),
    ("dull and terrible", "neg"),
]


def folder(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def outputs_of(runtime: Runtime, batch: np.ndarray) -> dict[str, Any]:
    """One request through every step, as the worker runs it."""
    return dict(runtime.postprocess(dict(runtime.predict(runtime.preprocess(batch)))))


@pytest.fixture(scope="module")
def forest() -> RandomForestRegressor:
    return RandomForestRegressor(n_estimators=10, random_state=0).fit(DIABETES_X, DIABETES_Y)


@pytest.fixture(scope="module")
def iris_forest() -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=10, random_state=0).fit(IRIS_X, IRIS_Y)


def onnx_folder(tmp_path: Path, model: Any, **options: Any) -> Path:
    path = folder(tmp_path, "onnx")
    onnx_model = to_onnx(model, IRIS_X[:1].astype(np.float32), options=options)
    (path / "model.onnx").write_bytes(onnx_model.SerializeToString())
    return path


def test_sklearn_forest_answers_like_sklearn(tmp_path: Path, forest: Any) -> None:
    path = folder(tmp_path, "forest")
    skops.io.dump(forest, path / "model.skops")
    runtime, signature = load_runtime(path, {"runtime": "sklearn"}, {})
    assert signature == Signature(
        (Tensor("features", "FP64", (-1, 10)),), (Tensor("predict", "FP64", (-1,)),)
    )
    answer = runtime.predict(DIABETES_X[:32])
    assert list(answer) == ["predict"]
    np.testing.assert_array_equal(answer["predict"], forest.predict(DIABETES_X[:32]))


def test_sklearn_keeps_the_input_name_metadata_declares(tmp_path: Path, forest: Any) -> None:
    path = folder(tmp_path, "forest")
    skops.io.dump(forest, path / "model.skops")
    metadata = {
        "inputs": [{"name": "rows", "datatype": "FP64", "shape": [-1, 10]}],
        "outputs": [{"name": "predict", "datatype": "FP64", "shape": [-1]}],
    }  # no runtime: inferred from model.skops
    _, signature = load_runtime(path, metadata, {})
    assert signature.inputs == (Tensor("rows", "FP64", (-1, 10)),)


def test_sklearn_text_pipeline_takes_strings(tmp_path: Path) -> None:
    texts, labels = (np.array(column) for column in zip(*CORPUS, strict=True))
    pipeline = make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, labels)
    path = folder(tmp_path, "text")
    skops.io.dump(pipeline, path / "model.skops")
    runtime, signature = load_runtime(path, {"runtime": "sklearn"}, {})
    assert signature == Signature(
        (Tensor("text", "BYTES", (-1,)),),
        (Tensor("predict", "BYTES", (-1,)), Tensor("predict_proba", "FP64", (-1, 2))),
        ("neg", "pos"),
    )
    batch = np.array(["what a wonderful story", "boring and dull", "it"])
    answer = runtime.predict(batch)
    np.testing.assert_array_equal(answer["predict"], pipeline.predict(batch))
    np.testing.assert_allclose(answer["predict_proba"], pipeline.predict_proba(batch))
    assert answer["predict"].tolist()[:2] == ["pos", "neg"]


def test_skops_types_outside_the_trusted_list_are_refused_until_listed(tmp_path: Path) -> None:
    model = make_pipeline(FunctionTransformer(operator.neg), Ridge()).fit(DIABETES_X, DIABETES_Y)
    path = folder(tmp_path, "neg")
    skops.io.dump(model, path / "model.skops")
    assert skops.io.get_untrusted_types(file=path / "model.skops") == ["_operator.neg"]
    with pytest.raises(ModelLoadError, match=r"_operator\.neg.*HUEYSERVE_TRUSTED_TYPES"):
        load_runtime(path, {"runtime": "sklearn"}, {})
    runtime, _ = load_runtime(path, {"runtime": "sklearn"}, {"trusted_types": ["_operator.neg"]})
    np.testing.assert_allclose(runtime.predict(DIABETES_X)["predict"], model.predict(DIABETES_X))


def test_onnx_forest_answers_like_onnxruntime_and_sklearn(tmp_path: Path, iris_forest: Any) -> None:
    path = onnx_folder(tmp_path, iris_forest, zipmap=False)
    runtime, signature = load_runtime(path, {"runtime": "onnx", "classes": [0, 1, 2]}, {})
    assert signature == Signature(
        (Tensor("X", "FP32", (-1, 4)),),
        (Tensor("label", "INT64", (-1,)), Tensor("probabilities", "FP32", (-1, 3))),
        (0, 1, 2),
    )
    answer = runtime.predict(IRIS_X)  # float64 rows, as the worker batches them
    options = SessionOptions()  # one thread, as the runtime: the sums' order is then the same
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = InferenceSession(
        str(path / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
    )
    label, probabilities = session.run(None, {"X": IRIS_X.astype(np.float32)})
    np.testing.assert_array_equal(answer["label"], label)
    np.testing.assert_array_equal(answer["probabilities"], probabilities)
    np.testing.assert_array_equal(answer["label"], iris_forest.predict(IRIS_X))
    np.testing.assert_allclose(
        answer["probabilities"], iris_forest.predict_proba(IRIS_X), atol=1e-6
    )


def test_onnx_text_model_gets_strings_in_the_rank_it_takes(tmp_path: Path) -> None:
    texts, labels = (np.array(column) for column in zip(*CORPUS, strict=True))
    # lowercase=False: lowercasing becomes a StringNormalizer, which needs an installed locale
    pipeline = make_pipeline(TfidfVectorizer(lowercase=False), LogisticRegression())
    pipeline.fit(texts, labels == "pos")
    options = {LogisticRegression: {"zipmap": False}}
    onnx_model = to_onnx(
        pipeline, initial_types=[("text", StringTensorType([None, 1]))], options=options
    )
    path = folder(tmp_path, "text")
    (path / "model.onnx").write_bytes(onnx_model.SerializeToString())
    runtime, signature = load_runtime(path, {"runtime": "onnx"}, {})
    assert signature.inputs == (Tensor("text", "BYTES", (-1, 1)),)
    batch = np.array(["what a wonderful story", "boring and dull"])  # 1-D, as the worker sends
    answer = runtime.predict(batch)
    np.testing.assert_array_equal(answer["label"], pipeline.predict(batch))
    np.testing.assert_allclose(answer["probabilities"], pipeline.predict_proba(batch), rtol=1e-5)


def test_onnx_zipmap_output_is_refused_with_the_fix(tmp_path: Path, iris_forest: Any) -> None:
    path = onnx_folder(tmp_path, iris_forest)
    with pytest.raises(ModelLoadError, match=r"ZipMap.*options=\{\"zipmap\": False\}"):
        load_runtime(path, {"runtime": "onnx"}, {})


def test_a_signature_metadata_gets_wrong_is_refused(tmp_path: Path, iris_forest: Any) -> None:
    path = onnx_folder(tmp_path, iris_forest, zipmap=False)
    outputs = [
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
    ]
    wrong = {"name": "X", "datatype": "FP64", "shape": [-1, 5]}
    with pytest.raises(ModelLoadError, match="signature mismatch: metadata.json declares inputs"):
        load_runtime(path, {"runtime": "onnx", "inputs": [wrong], "outputs": outputs}, {})
    right = {"name": "X", "datatype": "FP32", "shape": [-1, -1]}  # -1 matches any size
    _, signature = load_runtime(
        path, {"runtime": "onnx", "inputs": [right], "outputs": outputs}, {}
    )
    assert signature.inputs == (Tensor("X", "FP32", (-1, 4)),)


@pytest.mark.parametrize("file_name", ["model.json", "model.ubj"])
def test_xgboost_answers_like_xgboost(tmp_path: Path, file_name: str) -> None:
    model = xgboost.XGBClassifier(n_estimators=10, max_depth=3, n_jobs=1).fit(IRIS_X, IRIS_Y)
    path = folder(tmp_path, "xgboost")
    model.save_model(path / file_name)
    runtime, signature = load_runtime(path, {"runtime": "xgboost"}, {})
    assert signature == Signature(
        (Tensor("features", "FP32", (-1, 4)),), (Tensor("predict", "FP32", (-1, 3)),)
    )
    answer = runtime.predict(IRIS_X)["predict"]
    assert answer.dtype == np.float32
    own = model.get_booster().predict(xgboost.DMatrix(IRIS_X.astype(np.float32)))
    np.testing.assert_array_equal(answer, own)
    np.testing.assert_allclose(answer, model.predict_proba(IRIS_X), rtol=1e-6)


def test_lightgbm_answers_like_lightgbm(tmp_path: Path) -> None:
    params = {"objective": "regression", "verbose": -1, "num_threads": 1}
    booster = lightgbm.train(params, lightgbm.Dataset(DIABETES_X, DIABETES_Y), num_boost_round=10)
    path = folder(tmp_path, "lightgbm")
    booster.save_model(path / "model.txt")
    runtime, signature = load_runtime(path, {"runtime": "lightgbm"}, {})
    assert signature == Signature(
        (Tensor("features", "FP64", (-1, 10)),), (Tensor("predict", "FP64", (-1,)),)
    )
    np.testing.assert_allclose(runtime.predict(DIABETES_X)["predict"], booster.predict(DIABETES_X))


PYTHON_OVER_SKOPS = """
import numpy as np
from hueyserve.worker.runtimes.sklearn_runtime import SklearnRuntime

class Model(SklearnRuntime):
    def preprocess(self, rows):
        return rows * 10  # the forest was trained on features scaled by 10

    def postprocess(self, outputs):
        return {**outputs, "rounded": np.round(outputs["predict"])}
"""

PYTHON_OVER_NUMPY = """
import numpy as np
from hueyserve.worker.runtimes.base import Runtime

class Model(Runtime):
    def load(self):
        self.weights = np.load(self.folder / "weights.npy")
        return None  # it cannot tell: metadata.json declares the signature

    def predict(self, batch):
        return {"predict": batch @ self.weights}
"""


def test_python_model_preprocesses_and_postprocesses(tmp_path: Path) -> None:
    forest = RandomForestRegressor(n_estimators=10, random_state=0)
    forest.fit(DIABETES_X * 10, DIABETES_Y)
    path = folder(tmp_path, "python")
    skops.io.dump(forest, path / "model.skops")
    (path / "model.py").write_text(PYTHON_OVER_SKOPS)
    runtime, signature = load_runtime(path, {"runtime": "python"}, {"allow_python": True})
    assert signature.inputs == (Tensor("features", "FP64", (-1, 10)),)
    answer = outputs_of(runtime, DIABETES_X[:16])
    expected = forest.predict(DIABETES_X[:16] * 10)
    np.testing.assert_array_equal(answer["predict"], expected)
    np.testing.assert_array_equal(answer["rounded"], np.round(expected))


def test_python_model_without_a_signature_needs_one_declared(tmp_path: Path) -> None:
    path = folder(tmp_path, "numpy")
    np.save(path / "weights.npy", np.array([1.0, -2.0, 0.5]))
    (path / "model.py").write_text(PYTHON_OVER_NUMPY)
    options = {"allow_python": True}
    with pytest.raises(ModelLoadError, match="declare its inputs and outputs in metadata.json"):
        load_runtime(path, {"runtime": "python"}, options)
    metadata = {
        "runtime": "python",
        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 3]}],
        "outputs": [{"name": "predict", "datatype": "FP64", "shape": [-1]}],
    }
    runtime, signature = load_runtime(path, metadata, options)
    assert signature == Signature.from_metadata(metadata)
    np.testing.assert_array_equal(outputs_of(runtime, np.eye(3))["predict"], [1.0, -2.0, 0.5])


def test_python_models_are_refused_unless_allowed(tmp_path: Path) -> None:
    path = folder(tmp_path, "python")
    marker = tmp_path / "ran"
    (path / "model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(ModelLoadError) as refused:
        load_runtime(path, {"runtime": "python"}, {"allow_python": False})
    assert str(refused.value) == PYTHON_REFUSED
    with pytest.raises(ModelLoadError):  # inferred from model.py: refused all the same
        load_runtime(path, {}, {})
    assert not marker.exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("raise RuntimeError('no GPU here')\n", "failed to import: RuntimeError: no GPU here"),
        ("class Predictor:\n    pass\n", "has no Model class"),
        ("class Model:\n    pass\n", "must be a subclass of"),
    ],
)
def test_a_broken_model_py_is_refused_with_its_reason(
    tmp_path: Path, source: str, message: str
) -> None:
    path = folder(tmp_path, "python")
    (path / "model.py").write_text(source)
    with pytest.raises(ModelLoadError, match=message):
        load_runtime(path, {"runtime": "python"}, {"allow_python": True})


def test_an_unknown_runtime_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="unknown runtime 'torch'; known runtimes: sklearn"):
        load_runtime(tmp_path, {"runtime": "torch"}, {})


def test_runtime_libraries_are_imported_only_when_used() -> None:
    script = textwrap.dedent(
        """
        import sys
        from hueyserve.worker.runtimes import runtime_class
        runtime_class("sklearn")
        heavy = {"onnxruntime", "xgboost", "lightgbm"} & set(sys.modules)
        assert not heavy, heavy
        runtime_class("onnx")
        assert "onnxruntime" in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
