"""A host's model folder, and the catalog in Redis that it caches: versions, numbers allocated
once per deployment, artifacts freed with their last version, demos created once."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import redis

from hueyserve import wire
from hueyserve.artifacts import ArtifactStore
from hueyserve.training import DEMOS
from hueyserve.worker.fitting import ensure_demo_models
from hueyserve.worker.publishing import entries
from hueyserve.worker.repository import CatalogError, ModelRepository
from hueyserve.worker.store import ModelStore, write_estimator
from tests.helpers import train_diabetes


def host(redis_conn: redis.Redis, folder: Path) -> ModelRepository:
    """One worker host's view: its own folder, the deployment's Redis."""
    artifacts = ArtifactStore(redis_conn, max_bytes=64 * 1024 * 1024)
    return ModelRepository(redis_conn, ModelStore(folder), artifacts, {})


def test_versions_count_up_and_newest_wins(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.names() == [] and store.latest("m") is None
    model, metadata = train_diabetes(n_estimators=3)
    assert [store.save("m", model, metadata) for _ in range(3)] == ["1", "2", "3"]
    (tmp_path / "m" / "10").mkdir()  # incomplete: no artifact, never served
    (tmp_path / "m" / ".11-staging").mkdir()
    assert store.versions("m") == ["1", "2", "3"] and store.latest("m") == "3"
    assert store.metadata("m", "2")["version"] == "2"


def test_a_deleted_version_number_is_never_reused(redis_conn: redis.Redis, tmp_path: Path) -> None:
    """Numbers come from Redis, once for the whole deployment (caches key answers by them)."""
    repository = host(redis_conn, tmp_path / "a")
    model, metadata = train_diabetes(n_estimators=2)
    source = tmp_path / "source"
    source.mkdir()
    write_estimator(source, model, metadata)
    for expected in ("1", "2"):
        entry, _ = repository.add("m", source, metadata)
        assert entry.active == expected
    with pytest.raises(CatalogError, match="is active"):
        repository.delete("m", "2")
    repository.delete("m", "1")
    assert repository.add("m", source, metadata)[0].version_list() == ["2", "3"]
    assert repository.delete("m") is None and "m" not in entries(redis_conn)
    assert repository.add("m", source, metadata)[0].version_list() == ["4"]
    other = host(redis_conn, tmp_path / "b")  # another host allocates from the same count
    assert other.add("m", source, metadata)[0].version_list() == ["4", "5"]


def test_artifacts_are_freed_with_the_last_version_that_uses_them(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    repository = host(redis_conn, tmp_path / "a")
    source = tmp_path / "source"
    source.mkdir()
    for n_estimators in (2, 3):
        model, metadata = train_diabetes(n_estimators=n_estimators)
        write_estimator(source, model, metadata)
        repository.add("m", source, metadata)
    stored = set(redis_conn.scan_iter(match=wire.artifact_key("*")))
    assert len(stored) == 2 and all(redis_conn.ttl(key) == -1 for key in stored)
    repository.delete("m", "1")
    assert len(set(redis_conn.scan_iter(match=wire.artifact_key("*")))) == 1
    repository.delete("m")
    assert not set(redis_conn.scan_iter(match=wire.artifact_key("*")))
    assert not (tmp_path / "a" / "m").exists()


def test_a_version_reaches_a_host_that_never_had_it_and_is_checked(
    redis_conn: redis.Redis, tmp_path: Path
) -> None:
    first, second = host(redis_conn, tmp_path / "a"), host(redis_conn, tmp_path / "b")
    model, metadata = train_diabetes(n_estimators=3)
    source = tmp_path / "source"
    source.mkdir()
    write_estimator(source, model, metadata)
    first.add("m", source, metadata)
    rows = np.zeros((2, 10))
    fetched = second.load("m", "1")  # from Redis into b's folder
    assert fetched.answer(rows)["predict"] == model.predict(rows).tolist()
    (tmp_path / "b" / "m" / "1" / "model.skops").write_bytes(b"changed on this host")
    assert second.load("m", "1").answer(rows)["predict"] == model.predict(rows).tolist()
    assert list((tmp_path / "b" / ".replaced").iterdir())  # the changed copy, kept aside


def test_demo_models_are_created_once_per_deployment(
    redis_conn: redis.Redis, tmp_path: Path, demo_models: Path
) -> None:
    hosts = [host(redis_conn, tmp_path / name) for name in ("a", "b")]
    shutil.copytree(demo_models, tmp_path / "a")  # host a trained them already (0.2)
    for repository in hosts:
        repository.sync_local()
        repository.ensure_demos(Path())
    catalog = entries(redis_conn)
    assert {name: entry.version_list() for name, entry in catalog.items()} == {
        name: ["1"] for name in DEMOS
    }
    assert not (tmp_path / "b" / "diabetes").exists()  # b trained nothing: it fetches on use
    assert {m.decode() for m in redis_conn.smembers(wire.DEMOS_KEY)} == set(DEMOS)
    hosts[0].delete("iris")
    for repository in hosts:
        repository.ensure_demos(Path())  # a demo deleted on purpose stays deleted
    assert set(entries(redis_conn)) == {"diabetes"}


def test_demo_models_for_tests_and_benchmarks(demo_models: Path) -> None:
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
