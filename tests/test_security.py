"""Nobody gets in without a key (when keys are set), nobody sends more than the limit, and a
forged queue message is never run."""

from __future__ import annotations

import json
import logging
import pickle
import struct
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

import core
import main
from hueyserve import wire
from hueyserve.api import sessions
from hueyserve.api.paths import Access
from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.serializer import JsonSerializer
from hueyserve.settings import settings
from tests.helpers import PREDICT, GateModel, poll_job, services_of, wait_for

if TYPE_CHECKING:
    from pathlib import Path

BODY = {"instances": EXAMPLE_ROWS}


def test_without_a_key_only_probes_metrics_and_docs_answer(keyed: TestClient) -> None:
    for path in ("/health", "/v2/health/live", "/v2/health/ready", "/metrics", "/docs", "/v2"):
        assert keyed.get(path).status_code in (200, 503), path
    assert keyed.get("/openapi.json").status_code == 200
    for method, path in [
        ("POST", PREDICT),
        ("GET", "/v1/models"),
        ("GET", "/v2/models/diabetes"),
        ("POST", "/v2/models/diabetes/infer"),
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs/some-id"),
        ("DELETE", "/v1/jobs/some-id"),
        ("POST", "/v1/models/diabetes/train"),
        ("POST", "/v1/queue/purge"),
    ]:
        refused = keyed.request(method, path, json=BODY)
        assert refused.status_code == 401, (method, path)
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert "API key" in refused.json()["error"]


def test_a_predict_key_predicts_but_does_not_administer(keyed: TestClient) -> None:
    bearer = {"Authorization": "Bearer p-key"}
    assert keyed.post(PREDICT, json=BODY, headers=bearer).status_code == 200
    assert keyed.post(PREDICT, json=BODY, headers={"X-API-Key": "p-key"}).status_code == 200
    reload = keyed.post("/v1/models/diabetes/reload", headers=bearer)
    assert reload.status_code == 403 and "admin key" in reload.json()["error"]
    train = keyed.post("/v1/models/diabetes/train", json={}, headers=bearer)
    assert train.status_code == 403
    assert keyed.post("/v1/queue/purge", headers=bearer).status_code == 403
    wrong = keyed.post(PREDICT, json=BODY, headers={"Authorization": "Bearer p-kez"})
    assert wrong.status_code == 401 and wrong.json()["error"] == "unknown API key"


def test_an_admin_key_does_both(keyed: TestClient) -> None:
    admin = {"Authorization": "Bearer a-key"}
    assert keyed.post(PREDICT, json=BODY, headers=admin).status_code == 200
    assert keyed.post("/v1/models/diabetes/reload", headers=admin).status_code == 200


def test_a_body_over_the_limit_is_413_before_anything_reads_it(client: TestClient) -> None:
    big = b"[" + b"0," * (settings.max_body_bytes // 2) + b"0]"
    response = client.post(PREDICT, content=big, headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.headers["Connection"] == "close"
    assert "HUEYSERVE_MAX_BODY_BYTES" in response.json()["error"]


def test_a_forged_message_is_rejected_and_logged_never_run(
    consumer_factory: Any,
    serve_model: Any,
    redis_conn: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a secret, the API signs every task; an unsigned one put on the queue by someone
    with Redis access is dropped by the consumer with an error in its log."""
    monkeypatch.setattr(core.huey, "serializer", JsonSerializer("test-secret"))
    consumer_factory(workers=1)
    gate = GateModel()
    gate.release.set()
    with TestClient(main.app) as client, caplog.at_level(logging.ERROR, "huey.consumer"):
        serve_model("gate", gate, n_features=1, client=client)
        forged = core.predict.s("gate", "1", np.array([[42.0]]))
        unsigned = JsonSerializer().serialize(core.huey._registry.create_message(forged))
        member = struct.pack(">Q", time.time_ns() // 1000) + unsigned
        redis_conn.zadd(core.huey.storage.queue_key, {member: -50})
        accepted = client.post("/v1/jobs", json={"model": "gate", "instances": [[1]]})
        assert accepted.status_code == 202
        poll_job(client, accepted.json()["job_id"])  # signed by the API: runs
    assert 1.0 in gate.calls and 42.0 not in gate.calls
    assert any("Error reading from queue" in r.getMessage() for r in caplog.records)
    assert redis_conn.zcard(core.huey.storage.queue_key) == 0  # dropped, not left to retry


@pytest.mark.parametrize(
    # Issue 11.17: routes whose body FastAPI parses answered 400 (it hides why a read failed).
    "path",
    [PREDICT, "/v1/jobs", "/v1/models/diabetes/train", "/v1/models/diabetes/reload"],
)
def test_a_streamed_body_over_the_limit_is_413_too(client: TestClient, path: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted as it comes
        yield b'{"instances": ['
        for _ in range(settings.max_body_bytes // 1000):
            yield b"[" + b"0," * 499 + b"0],"
        yield b"[0]]}"

    response = client.post(path, content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "HUEYSERVE_MAX_BODY_BYTES" in response.json()["error"]


# --- issue 11.17: limits hold on every path ---------------------------------------------------


def test_a_cached_answer_does_not_skip_the_idempotency_key_check(client: TestClient) -> None:
    body = {"instances": EXAMPLE_ROWS[:1]}
    assert client.post(PREDICT, json=body).status_code == 200
    assert client.post(PREDICT, json=body).headers["X-Cache"] == "hit"
    refused = client.post(PREDICT, json=body, headers={"Idempotency-Key": "k" * 201})
    assert refused.status_code == 422 and "idempotency-key" in refused.json()["error"]


def test_a_job_id_is_bounded_and_never_echoed_in_full(client: TestClient) -> None:
    answer = client.get("/v1/jobs/" + "j" * 5000)
    assert answer.status_code == 422 and "j" * 300 not in answer.text
    assert "job_id" in answer.json()["error"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "text/plain"},
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    ],
)
def test_v2_infer_refuses_a_body_it_cannot_read_with_a_415(
    client: TestClient, headers: dict[str, str]
) -> None:
    tensor = {"name": "features", "datatype": "FP64", "shape": [1, 10], "data": EXAMPLE_ROWS[0]}
    body = json.dumps({"inputs": [tensor]})
    answer = client.post("/v2/models/diabetes/infer", content=body, headers=headers)
    assert answer.status_code == 415, answer.text


# --- issue 11.7: a worker that does not share the API's secret is not a ready worker ---------


def test_readiness_says_when_no_worker_shares_the_api_s_secret(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "readiness")
    core.worker.heartbeat.stop()  # its heartbeat goes...
    # ...and comes back as a worker started with another HUEYSERVE_SECRET would prove itself
    monkeypatch.setattr(core.worker.heartbeat, "proof", wire.secret_proof("another secret"))
    core.worker.heartbeat.start()
    ready = wait_for(
        lambda: (r := client.get("/v2/health/ready")).status_code == 503 and r, "not ready"
    )
    assert "HUEYSERVE_SECRET" in " ".join(ready.json()["reasons"])
    assert client.get("/v2/models/diabetes/ready").status_code == 503
    core.worker.heartbeat.stop()
    monkeypatch.undo()
    core.worker.heartbeat.start()
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "ready again")


def test_a_secret_proof_tells_secrets_apart_and_reveals_none() -> None:
    proofs = {wire.secret_proof(s) for s in (None, "s1", "s2")}
    assert len(proofs) == 3 and not any("s1" in p or "s2" in p for p in proofs)
    assert wire.secret_proof("s1") == wire.secret_proof("s1")


# --- issue 11.8: names and versions read from Redis are checked like a request's -------------


def test_a_tampered_catalog_entry_is_ignored_and_never_loaded(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    body = {"instances": EXAMPLE_ROWS[:1]}
    assert client.post(PREDICT, json=body).headers["X-Model-Version"] == "1"
    catalog = services_of(client).catalog
    wait_for(lambda: "iris" in catalog.models, "iris to be published")
    entry = json.loads(redis_conn.hget(wire.MODELS_KEY, "diabetes"))
    entry["versions"]["../iris/1"] = entry["versions"]["1"]
    entry["active"] = "../iris/1"  # a Redis writer points diabetes at iris's folder
    tampered = json.dumps(entry)
    redis_conn.hset(wire.MODELS_KEY, "diabetes", tampered)
    redis_conn.publish(wire.MODELS_CHANNEL, tampered)
    marker = json.loads(redis_conn.hget(wire.MODELS_KEY, "iris"))
    marker["pinned"] = True  # a harmless change after it: once seen, the tamper was read
    redis_conn.publish(wire.MODELS_CHANNEL, json.dumps(marker))
    wait_for(lambda: catalog.models["iris"].pinned, "the marker")
    answer = client.post(PREDICT, json={"instances": EXAMPLE_ROWS[1:]})
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == "1"
    with pytest.raises(ValueError, match="version"):
        core.worker.registry.get("diabetes", "../iris/1")


# --- issue 11.1: nothing read from Redis is unpickled, by the workers or by the API ----------


class Trap:
    """Unpickling this creates `path`: a Redis writer's way to run code in whoever reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self.path).touch, (self.path,))


def queue_pickle(redis_conn: redis.Redis, payload: bytes) -> None:
    """Put `payload` on the queue as a task entry, and ring the workers' doorbell."""
    queue = core.huey.storage.queue_key
    redis_conn.zadd(queue, {wire.queue_entry(payload): -50})
    redis_conn.rpush(wire.doorbell_key(queue), b"1")


def test_a_pickle_on_the_queue_runs_in_no_worker(
    consumer: Any, redis_conn: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = tmp_path / "ran-in-a-worker"
    with caplog.at_level(logging.ERROR, "huey.consumer"):
        queue_pickle(redis_conn, pickle.dumps(Trap(marker)))
        wait_for(
            lambda: any("Error reading from queue" in r.getMessage() for r in caplog.records),
            "the worker to refuse it",
        )
    assert not marker.exists()
    assert redis_conn.zcard(core.huey.storage.queue_key) == 0  # dropped, not left to retry


def test_a_pickle_in_redis_runs_nowhere_in_the_api(
    redis_conn: redis.Redis, model_store: Any, tmp_path: Path
) -> None:
    """No consumer runs: what the API reads is only what the test put there."""
    read_job, purged = tmp_path / "ran-reading-a-job", tmp_path / "ran-in-a-purge"
    job_id = "0b9d2c8e-1111-4222-8333-944455556666"
    redis_conn.hset(wire.job_key(job_id), mapping={"status": "done", "kind": "predict"})
    redis_conn.set(core.huey.storage.result_key(job_id), pickle.dumps(Trap(read_job)))
    queue_pickle(redis_conn, pickle.dumps(Trap(purged)))
    with TestClient(main.app) as client:
        job = client.get(f"/v1/jobs/{job_id}")
        purge = client.post("/v1/queue/purge")
    assert not read_job.exists() and not purged.exists()
    assert job.status_code == 200 and job.json()["status"] == "failed"
    assert "cannot be read" in job.json()["error"]
    assert purge.status_code == 200


def test_a_result_copied_onto_another_job_is_refused(
    client: TestClient, redis_conn: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the secret, a Redis writer cannot forge a result, nor move a signed one."""
    monkeypatch.setattr(core.huey, "serializer", JsonSerializer("test-secret"))
    body = {"model": "diabetes", "instances": [[0.01] * 10]}
    first, second = (client.post("/v1/jobs", json=body).json()["job_id"] for _ in range(2))
    poll_job(client, first), poll_job(client, second)
    stored = redis_conn.get(core.huey.storage.result_key(first))
    redis_conn.set(core.huey.storage.result_key(second), stored)
    assert client.get(f"/v1/jobs/{first}").json()["status"] == "done"
    copied = client.get(f"/v1/jobs/{second}").json()
    assert copied["status"] == "failed" and "another job" in copied["error"]
    unsigned = JsonSerializer().dump_result(first, {"predict": [1e6]})
    redis_conn.set(core.huey.storage.result_key(first), unsigned)
    forged = client.get(f"/v1/jobs/{first}").json()
    assert forged["status"] == "failed" and "signature" in forged["error"]


# --- issue 11.18: with keys on, the open probes say no more than ready or not -----------------


def test_with_keys_only_an_admin_key_sees_health_details_and_reasons(
    keyed: TestClient, redis_conn: redis.Redis
) -> None:
    wait_for(lambda: keyed.get("/v2/health/ready").status_code == 200, "readiness")
    assert keyed.get("/health").json() == {"ready": True}
    predict_key = keyed.get("/health", headers={"Authorization": "Bearer p-key"}).json()
    assert predict_key == {"ready": True}
    details = keyed.get("/health", headers={"Authorization": "Bearer a-key"}).json()
    assert details["ready"] is True and details["redis"]["workers"] and details["models"]
    redis_conn.config_set("maxmemory-policy", "allkeys-lru")  # not ready, with a reason
    try:
        refused = wait_for(
            lambda: (r := keyed.get("/v2/health/ready")).status_code == 503 and r, "not ready"
        )
        assert refused.json() == {"ready": False}
        told = keyed.get("/v2/health/ready", headers={"X-API-Key": "a-key"}).json()
        assert "maxmemory-policy" in " ".join(told["reasons"])
    finally:
        redis_conn.config_set("maxmemory-policy", "noeviction")


# --- issue 11.15: two clients choosing the same idempotency key never share a job -----------


def test_each_api_key_has_its_own_idempotency_keys(keyed: TestClient) -> None:
    body = {"model": "diabetes", "instances": [[0.02] * 10]}

    def submit(api_key: str) -> str:
        headers = {"Authorization": f"Bearer {api_key}", "Idempotency-Key": "order-1"}
        answer = keyed.post("/v1/jobs", json=body, headers=headers)
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["job_id"]
        return job_id

    first = submit("p-key")
    assert submit("p-key") == first  # the same client's retry finds its job
    assert submit("a-key") != first  # another key's same idempotency key is its own


def test_a_session_cookie_stands_for_its_key_for_reads_only(keyed: TestClient) -> None:
    """Pages get a cookie for the key they hold (EventSource cannot send headers); it reads,
    never changes anything, and says nothing of the key."""
    assert keyed.get("/v1/session").json() == {"keys": True, "access": None}
    assert keyed.post("/v1/session").status_code == 401  # a key is needed to get one
    started = keyed.post("/v1/session", headers={"X-API-Key": "p-key"})
    assert started.json()["access"] == "predict"
    cookie = started.cookies[sessions.COOKIE]
    assert "p-key" not in cookie and "httponly" in started.headers["set-cookie"].lower()
    assert "samesite=strict" in started.headers["set-cookie"].lower()
    assert keyed.cookies.get(sessions.COOKIE) == cookie  # the client keeps it, as a browser
    assert keyed.get("/v1/session").json()["access"] == "predict"
    assert keyed.get("/v1/models").status_code == 200
    body = {"model": "diabetes", "instances": EXAMPLE_ROWS}
    assert keyed.post("/v1/jobs", json=body).status_code == 401
    keys = {Access.PREDICT: frozenset({"p-key"}), Access.ADMIN: frozenset({"a-key"})}
    assert sessions.check(cookie, keys) is Access.PREDICT
    assert sessions.check(cookie.replace("predict", "admin", 1), keys) is None  # claims more
    assert sessions.check(cookie[:-1] + ("0" if cookie[-1] != "0" else "1"), keys) is None
    assert sessions.check(cookie, {Access.PREDICT: frozenset({"another-key"})}) is None
    assert sessions.check(sessions.mint("p-key", Access.PREDICT, ttl_s=-1), keys) is None
    keyed.cookies.clear()
    odd = b"hueyserve_session=predict.\xb2.x.sig"  # not a number: no access, and no 500
    assert keyed.get("/v1/models", headers={"Cookie": odd}).status_code == 401
    with pytest.raises(WebSocketDisconnect) as closed:  # a socket without key nor session
        with keyed.websocket_connect("/v1/jobs/some-id/events"):
            pass
    assert closed.value.code == 1008
