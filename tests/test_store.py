"""The model store: versions, atomic saves, skops with trusted types only."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.preprocessing import FunctionTransformer

from hueyserve.training import DEMOS
from hueyserve.worker.fitting import ensure_demo_models
from hueyserve.worker.store import ModelStore, UntrustedModelFile
from tests.helpers import train_diabetes


def test_versions_count_up_and_newest_wins(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.names() == [] and store.latest("m") is None
    model, metadata = train_diabetes(n_estimators=3)
    assert [store.save("m", model, metadata) for _ in range(3)] == ["1", "2", "3"]
    (tmp_path / "m" / "10").mkdir()  # incomplete: no artifact, never served
    (tmp_path / "m" / ".11-staging").mkdir()
    assert store.versions("m") == ["1", "2", "3"] and store.latest("m") == "3"
    assert store.metadata("m", "2")["version"] == "2"


def test_a_deleted_version_number_is_never_reused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    model, metadata = train_diabetes(n_estimators=2)
    store.save("m", model, metadata)
    store.save("m", model, metadata)
    shutil.rmtree(tmp_path / "m" / "2")  # a bad version withdrawn
    assert store.save("m", model, metadata) == "3"
    shutil.rmtree(tmp_path / "m")  # the whole model removed, then trained again
    assert store.save("m", model, metadata) == "4"


def test_demo_models_are_bootstrapped_once(demo_models: Path) -> None:
    store = ModelStore(demo_models)  # the session's, made by ensure_demo_models
    ensure_demo_models(store, Path())
    assert store.names() == sorted(DEMOS) and store.versions("diabetes") == ["1"]
    metadata = store.metadata("diabetes", "1")
    assert metadata["n_features"] == 10 and len(metadata["features"]) == 10
    assert metadata["params"]["n_estimators"] == 100
    assert {"r2", "mae", "rmse"} <= set(metadata["metrics"]) and metadata["created"]
    assert metadata["outputs"] == [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
    assert store.load("diabetes", "1").predict(np.zeros((1, 10))).shape == (1,)
    iris = store.metadata("iris", "1")
    assert iris["task"] == "classification" and iris["metrics"]["accuracy"] > 0.9
    assert iris["classes"] == ["setosa", "versicolor", "virginica"]
    assert iris["inputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]
    assert [o["datatype"] for o in iris["outputs"]] == ["BYTES", "FP64"]


def test_untrusted_model_file_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    store.save("evil", FunctionTransformer(func=os.getcwd), {"n_features": 1})
    with pytest.raises(UntrustedModelFile, match="not trusted"):
        store.load("evil", "1")
