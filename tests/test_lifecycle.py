"""The model life cycle through the real queue: train a version, promote it, serve it, address
old versions explicitly, pin and unpin with reload, retrain when the data changes."""

from __future__ import annotations

import datetime
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

import core
import main
from hueyserve import wire
from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.settings import settings
from hueyserve.training import TrainingError, TrainPlan
from hueyserve.worker import publishing
from hueyserve.worker.fitting import Owner, Trainer, train_to_folder
from hueyserve.worker.registry import LoadedModel, ModelRegistry
from hueyserve.worker.store import ModelStore
from tests.helpers import PREDICT, poll_job, services_of, wait_for

#: A training is a child process, a fit, then the check every new version gets (load, smoke
#: prediction, upload): seconds alone, more beside another suite on two cores.
TRAINING_WAIT_S = 60.0


def train(client: TestClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Submit a training job and wait until it is done; returns the finished job."""
    accepted = client.post(f"/v1/models/{name}/train", json=body)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["model_name"] == name
    return poll_job(client, accepted.json()["job_id"], timeout_s=TRAINING_WAIT_S)


def active(client: TestClient, name: str) -> str:
    service = services_of(client)
    return str(service.catalog.get(name).version)


def write_csv(name: str, rows: list[list[Any]], header: list[str]) -> Path:
    path: Path = settings.dataset_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_promote_serve_and_address_old_version(
    client: TestClient, model_store: ModelStore
) -> None:
    job = train(client, "diabetes", {"params": {"n_estimators": 10, "max_depth": 4}})
    assert job["kind"] == "train" and job["priority"] == settings.train_priority
    assert job["result"]["model_version"] == "2" and job["result"]["active_version"] == "2"
    assert job["model_version"] == "2"
    assert set(job["result"]["metrics"]) == {"r2", "mae", "rmse"}
    wait_for(lambda: active(client, "diabetes") == "2", "the API to see version 2")
    metadata = model_store.metadata("diabetes", "2")
    assert metadata["params"] == {"n_estimators": 10, "max_depth": 4}
    assert metadata["training"]["plan"]["dataset"] == "diabetes"

    rows = np.array(EXAMPLE_ROWS)
    new = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
    assert new.headers["X-Model-Version"] == "2"
    assert new.json()["predictions"] == model_store.load("diabetes", "2").predict(rows).tolist()
    old = client.post("/v1/models/diabetes/versions/1:predict", json={"instances": EXAMPLE_ROWS})
    assert old.json()["model_version"] == "1"
    assert old.json()["predictions"] == model_store.load("diabetes", "1").predict(rows).tolist()
    assert client.get("/v1/models/diabetes").json()["versions"] == ["1", "2"]


def test_new_model_from_a_csv(client: TestClient, model_store: ModelStore) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = x @ [2.0, -1.0, 0.5] + 3
    write_csv("lines.csv", np.column_stack([x, y]).tolist(), ["a", "b", "c", "y"])
    job = train(client, "lines", {"dataset": "lines.csv", "estimator": "Ridge"})
    assert job["result"]["model_version"] == "1" and job["result"]["metrics"]["r2"] > 0.99
    wait_for(lambda: "lines" in client.get("/v1/models").json()["models"], "the new model")
    meta = client.get("/v2/models/lines").json()
    assert meta["inputs"][0]["shape"] == [-1, 3] and meta["parameters"]["features"] == list("abc")
    answer = client.post("/v1/models/lines:predict", json={"instances": [[1, 1, 1]]}).json()
    assert answer["predictions"] == pytest.approx([4.5], abs=0.05)


def test_classifier_from_a_csv_with_text_labels(
    client: TestClient, model_store: ModelStore
) -> None:
    rows = [[i, i % 7, "big" if i > 20 else "small"] for i in range(40)]
    write_csv("sizes.csv", rows, ["size", "noise", "label"])
    body = {"dataset": "sizes.csv", "target": "label", "estimator": "RandomForestClassifier"}
    job = train(client, "sizes", {**body, "params": {"n_estimators": 5}})
    assert job["result"]["metrics"]["accuracy"] > 0.8
    wait_for(lambda: "sizes" in client.get("/v1/models").json()["models"], "the new model")
    prediction = client.post("/v1/models/sizes:predict", json={"instances": [[35, 1]]}).json()
    assert prediction["predictions"][0]["class"] == "big"
    assert set(prediction["predictions"][0]["probabilities"]) == {"big", "small"}


def test_training_that_fails_in_the_worker_says_why(
    client: TestClient, model_store: ModelStore
) -> None:
    write_csv("labels.csv", [[i, "x" if i % 2 else "y"] for i in range(10)], ["v", "label"])
    accepted = client.post(
        "/v1/models/labels/train", json={"dataset": "labels.csv", "estimator": "Ridge"}
    )
    job = poll_job(client, accepted.json()["job_id"], status="failed", timeout_s=TRAINING_WAIT_S)
    assert "holds labels; use a classifier" in job["error"]


@pytest.mark.parametrize(
    ("name", "body", "fragment"),
    [
        ("diabetes", {"params": {"n_estimators": -1}}, "n_estimators"),
        ("diabetes", {"params": {"n_estimators": "many"}}, "n_estimators"),
        ("diabetes", {"params": {"colour": "red"}}, "Invalid parameter 'colour'"),
        ("diabetes", {"estimator": "SVC"}, "unknown estimator 'SVC'"),
        ("diabetes", {"dataset": "mnist"}, "unknown dataset 'mnist'"),
        ("diabetes", {"dataset": "../secrets.csv"}, "outside the data folder"),
        ("diabetes", {"dataset": "missing.csv"}, "no file 'missing.csv'"),
        ("diabetes", {"test_size": 1.5}, "test_size"),
        ("diabetes", {"epochs": 3}, "epochs"),
        ("diabetes", {"priority": 100}, "priority"),
        ("diabetes", {"params": {"n_jobs": -1}}, "n_jobs: training uses one core"),
        ("diabetes", {"dataset": "a\u0000.csv"}, "not a usable file name"),
        ("diabetes", {"dataset": "\u00e9" * 190 + ".csv"}, "not a usable file name"),
        ("brand-new", {"dataset": "iris"}, "needs 'dataset' and 'estimator'"),
    ],
)
def test_bad_training_requests_are_422(
    client: TestClient, name: str, body: dict[str, Any], fragment: str
) -> None:
    response = client.post(f"/v1/models/{name}/train", json=body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["error"]


def test_reload_pins_a_version_and_unpins_to_the_newest(
    client: TestClient, model_store: ModelStore
) -> None:
    train(client, "iris", {"params": {"C": 0.1}})
    wait_for(lambda: active(client, "iris") == "2", "version 2")
    pinned = client.post("/v1/models/iris/reload", json={"version": "1"})
    assert pinned.status_code == 200, pinned.text
    body = pinned.json()
    assert (body["active_version"], body["previous_version"], body["pinned"]) == ("1", "2", True)
    assert active(client, "iris") == "1"  # this API process knows before it answers
    core.refresh_models.call_local()  # the periodic refresh leaves a pinned model alone
    assert client.get("/v1/models/iris").json()["active_version"] == "1"
    unpinned = client.post("/v1/models/iris/reload").json()
    assert (unpinned["active_version"], unpinned["pinned"]) == ("2", False)
    assert client.post("/v1/models/iris/reload", json={"version": "5"}).status_code == 404
    assert client.post("/v1/models/nope/reload").status_code == 404


def test_a_version_that_does_not_load_is_refused(
    client: TestClient, model_store: ModelStore, redis_conn: redis.Redis
) -> None:
    train(client, "iris", {})
    wait_for(lambda: active(client, "iris") == "2", "version 2")
    digest = publishing.entries(redis_conn)["iris"].versions["1"]["files"]["model.skops"]["sha256"]
    redis_conn.setrange(wire.artifact_key(digest), 100, b"altered")  # this host's copy is gone
    shutil.rmtree(model_store.root / "iris" / "1")
    core.worker.registry.clear()
    response = client.post("/v1/models/iris/reload", json={"version": "1"})
    assert response.status_code == 409 and "does not load" in response.json()["error"]
    assert "does not match its SHA-256" in response.json()["error"]
    assert client.get("/v1/models/iris").json()["active_version"] == "2"


def test_scheduled_retrain_follows_the_data(client: TestClient, model_store: ModelStore) -> None:
    rows = [[i, 2 * i + 1] for i in range(30)]
    path = write_csv("trend.csv", rows, ["x", "y"])
    train(client, "trend", {"dataset": "trend.csv", "estimator": "Ridge"})
    assert core.retrain_models.call_local() == {}  # data unchanged: nothing to do
    path.write_text(path.read_text() + "".join(f"{i},{3 * i}\n" for i in range(30, 60)))
    assert core.retrain_models.call_local() == {"trend": "2"}
    wait_for(lambda: active(client, "trend") == "2", "the retrained version")
    metadata = model_store.metadata("trend", "2")
    assert metadata["training"]["n_train"] + metadata["training"]["n_test"] == 60


def test_entries_in_an_old_format_are_republished(
    redis_conn: redis.Redis, consumer_factory: Any
) -> None:
    """Redis kept (AOF) what an older release wrote: nothing crashes, workers rewrite it."""
    old = b'{"name": "diabetes", "version": "1", "metadata": {"n_features": 10}}'
    redis_conn.hset(wire.MODELS_KEY, "diabetes", old)
    consumer_factory(workers=1)
    wait_for(lambda: "diabetes" in publishing.entries(redis_conn), "the entry to be republished")
    with TestClient(main.app) as client:
        response = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
        assert response.status_code == 200, response.text


def test_a_model_removed_from_a_hosts_folder_is_fetched_again(
    client: TestClient, model_store: ModelStore, redis_conn: redis.Redis
) -> None:
    """The catalog in Redis is the truth: a host's folder is only its cache."""
    shutil.rmtree(model_store.root / "iris")
    core.refresh_models.call_local()
    core.worker.registry.clear()
    assert set(publishing.entries(redis_conn)) == {"diabetes", "iris"}
    response = client.post("/v1/models/iris:predict", json={"instances": [[5.1, 3.5, 1.4, 0.2]]})
    assert response.status_code == 200, response.text
    assert (model_store.root / "iris" / "1" / "model.skops").is_file()


def test_scheduled_retrain_runs_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    at_three = datetime.datetime(2026, 11, 23, 3, 0)
    assert not core._retrain_due(at_three)  # off by default
    monkeypatch.setattr(settings, "retrain_cron", "0 3 * * *")
    assert core._retrain_due(at_three)
    assert not core._retrain_due(at_three.replace(minute=1))


def test_training_respects_a_pinned_version(client: TestClient, model_store: ModelStore) -> None:
    train(client, "iris", {})
    client.post("/v1/models/iris/reload", json={"version": "1"})
    job = train(client, "iris", {"params": {"C": 0.5}})
    result = job["result"]
    assert (result["model_version"], result["active_version"], result["pinned"]) == ("3", "1", True)
    assert client.get("/v1/models/iris").json()["versions"] == ["1", "2", "3"]


def test_one_training_at_a_time(
    client: TestClient, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(core, "TRAINING_RETRY_S", 0.2)
    accepted = [
        client.post("/v1/models/iris/train", json={"random_state": seed}).json() for seed in (1, 2)
    ]
    jobs = [poll_job(client, job["job_id"], timeout_s=TRAINING_WAIT_S) for job in accepted]
    assert sorted(job["result"]["model_version"] for job in jobs) == ["2", "3"]
    spans = sorted((job["started_at"], job["finished_at"]) for job in jobs)
    assert spans[0][1] <= spans[1][0]  # the second (last) start came after the first ended


def test_training_past_its_time_limit_is_stopped(
    client: TestClient, model_store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "train_timeout_s", 0.2)
    accepted = client.post("/v1/models/diabetes/train", json={"params": {"n_estimators": 500}})
    job = poll_job(client, accepted.json()["job_id"], status="failed", timeout_s=TRAINING_WAIT_S)
    assert "took longer than 0.2s" in job["error"]
    assert model_store.versions("diabetes") == ["1"]


def test_active_versions_are_never_evicted(model_store: ModelStore) -> None:
    registry = ModelRegistry(
        lambda name, version: LoadedModel.from_estimator(
            name, version, model_store.load(name, version), model_store.metadata(name, version)
        ),
        max_loaded=1,
    )
    registry.keep_active({("diabetes", "1"), ("iris", "1")})
    held = registry.get("iris", "1")
    model_store.save("diabetes", *model_store_model(model_store))
    newest = registry.get("diabetes", "2")  # an old-version request fills the one-slot LRU
    assert registry.get("iris", "1") is held
    registry.keep_active({("diabetes", "2")})  # iris no longer active: back into the LRU
    registry.get("diabetes", "1")  # fills the one slot: iris is evicted
    assert registry.get("diabetes", "2") is newest  # active now: kept, never loaded again
    assert registry.get("iris", "1") is not held  # evicted once no longer active: loaded again


def model_store_model(store: ModelStore) -> tuple[Any, dict[str, Any]]:
    return store.load("diabetes", "1"), store.metadata("diabetes", "1")


def test_the_training_lock_is_renewed_while_a_training_runs(
    redis_conn: redis.Redis, model_store: ModelStore
) -> None:
    """Issue 11.4: the lock was renewed from another thread with redis-py's per-thread token,
    so every renewal failed and a second training started once the first lease lapsed."""
    short = settings.model_copy(update={"lease_s": 3.0})
    first, second = (Trainer(redis_conn, core.worker.repository, short) for _ in range(2))
    with first.slot(wait_s=None) as mine:
        assert mine
        time.sleep(4.0)  # past the lease: only renewals keep the lock
        with second.slot(wait_s=None) as theirs:
            assert not theirs, "a second training got the lock while the first one ran"
    with second.slot(wait_s=None) as theirs:
        assert theirs  # released at the end


def test_a_training_that_lost_its_lock_saves_nothing(
    redis_conn: redis.Redis, model_store: ModelStore
) -> None:
    """Issue 11.5: a fit that outlived its worker's lock wrote a version that no job reports."""
    plan = TrainPlan("diabetes", "Ridge", {})
    url = f"redis://127.0.0.1:{redis_conn.connection_pool.connection_kwargs['port']}/0"
    redis_conn.set(wire.TRAINING_LOCK_KEY, b"someone-else")
    with pytest.raises(TrainingError, match="lost its lock"):
        train_to_folder(model_store, plan, Path(), Owner(url, b"mine"))
    assert model_store.versions("diabetes") == ["1"]
    redis_conn.set(wire.TRAINING_LOCK_KEY, b"mine")
    folder = Path(train_to_folder(model_store, plan, Path(), Owner(url, b"mine")))
    assert (folder / "model.skops").is_file() and model_store.versions("diabetes") == ["1"]


def test_a_csv_target_that_is_not_a_column_is_a_422(client: TestClient) -> None:
    """Issue 11.17: it was accepted, and failed only in the worker."""
    write_csv("columns.csv", [[1, 2], [3, 4], [5, 6]], ["x", "y"])
    body = {"dataset": "columns.csv", "target": "z", "estimator": "Ridge"}
    response = client.post("/v1/models/columns/train", json=body)
    assert response.status_code == 422, response.text
    assert "no column 'z'; columns: x, y" in response.json()["error"]


def test_each_periodic_task_is_enqueued_once_per_minute_however_many_consumers(
    redis_conn: redis.Redis,
) -> None:
    """Issue 11.21: every consumer's scheduler enqueued its own refresh each minute."""
    noon = datetime.datetime(2026, 11, 30, 12, 0, 5)
    first = core.huey.read_periodic(noon)  # one consumer's scheduler...
    second = core.huey.read_periodic(noon.replace(second=40))  # ...another's, the same minute
    assert [task.name for task in first] == ["refresh_models"] and second == []
    later = core.huey.read_periodic(noon + datetime.timedelta(minutes=1))
    assert [task.name for task in later] == ["refresh_models"]
