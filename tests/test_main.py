"""The HTTP API end to end: real Redis, Huey's consumer in-process, the real app."""

from __future__ import annotations

import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import core
import main
from hueyserve import wire
from hueyserve.api.schemas import EXAMPLE_ROWS
from hueyserve.api.services import Services
from hueyserve.settings import settings
from hueyserve.worker.store import ModelStore
from tests.helpers import (
    PREDICT,
    FlakyModel,
    GateModel,
    poll_job,
    train_diabetes,
    wait_for,
)


def test_sync_predict_matches_model(client: TestClient, model_store: ModelStore) -> None:
    response = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
    assert response.status_code == 200, response.text
    body = response.json()
    direct = model_store.load("diabetes", "1").predict(np.array(EXAMPLE_ROWS))
    assert body["predictions"] == direct.tolist()
    assert (body["model_name"], body["model_version"]) == ("diabetes", "1")
    assert response.headers["X-Cache"] == "miss"


def test_async_submit_poll_returns_sync_value(client: TestClient) -> None:
    sync = client.post(PREDICT, json={"instances": EXAMPLE_ROWS[:1]}).json()
    accepted = client.post(
        PREDICT, json={"instances": EXAMPLE_ROWS[:1]}, headers={"Prefer": "respond-async"}
    )
    assert accepted.status_code == 202
    job_id = accepted.json()["job_id"]
    assert accepted.headers["Location"] == f"/v1/jobs/{job_id}"
    job = poll_job(client, job_id)
    assert job["result"] == {"predictions": sync["predictions"]}
    assert job["attempts"] == 1 and job["created_at"] <= job["started_at"] <= job["finished_at"]
    # readable again, as often as wanted
    assert client.get(f"/v1/jobs/{job_id}").json()["result"] == job["result"]


def test_jobs_endpoint_submits_explicitly(client: TestClient) -> None:
    accepted = client.post("/v1/jobs", json={"model": "diabetes", "instances": EXAMPLE_ROWS})
    assert accepted.status_code == 202
    job = poll_job(client, accepted.json()["job_id"])
    assert len(job["result"]["predictions"]) == 2
    assert job["priority"] == settings.async_priority


def test_cache_hit_skips_enqueue(
    client: TestClient, services: Services, redis_conn: redis.Redis
) -> None:
    first = client.post(PREDICT, json={"instances": [[1, 0, 2, 0, 0, 0, 0, 0, 0, 0]]})
    assert first.headers["X-Cache"] == "miss"
    enqueued = services.queue.enqueued
    # the same values written differently (ints, then floats) are the same canonical input
    second = client.post(PREDICT, json={"instances": [[1.0, 0.0, 2.0] + [0.0] * 7]})
    assert second.headers["X-Cache"] == "hit"
    assert "X-Job-Id" not in second.headers
    assert second.json() == first.json()
    assert services.queue.enqueued == enqueued
    assert client.get("/health").json()["cache"]["hits"] == 1


def test_high_priority_runs_first(
    consumer_factory: Any, serve_model: Any, redis_conn: redis.Redis
) -> None:
    consumer_factory(workers=1)
    gate = GateModel()
    with TestClient(main.app) as client:
        serve_model("gate", gate, n_features=1, client=client)
        blocker = submit(client, "gate", 0.0, priority=0)
        assert gate.started.wait(10), "the only worker never started the blocking job"
        low = [submit(client, "gate", float(i), priority=1) for i in (1, 2, 3)]
        high = submit(client, "gate", 9.0, priority=90)
        gate.release.set()
        for job_id in [blocker, *low, high]:
            poll_job(client, job_id)
    assert gate.calls == [0.0, 9.0, 1.0, 2.0, 3.0]


def test_failed_attempt_is_retried(client: TestClient, serve_model: Any) -> None:
    flaky = FlakyModel(failures=1)
    serve_model("flaky", flaky, n_features=2, client=client)
    response = client.post("/v1/models/flaky:predict", json={"instances": [[1, 2]]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [3.0]
    job = client.get(f"/v1/jobs/{response.headers['X-Job-Id']}").json()
    assert job["attempts"] == 2 and job["status"] == "done"


def test_failure_after_retries_is_reported(client: TestClient, serve_model: Any) -> None:
    serve_model("broken", FlakyModel(failures=99), n_features=1, client=client)
    accepted = client.post("/v1/jobs", json={"model": "broken", "instances": [[1]]})
    job = poll_job(client, accepted.json()["job_id"], status="failed")
    assert "flaky failure 3" in job["error"]
    assert job["attempts"] == 1 + settings.retries


def test_refresh_serves_new_version_without_stale_cache(
    client: TestClient, services: Services, model_store: ModelStore
) -> None:
    old = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
    assert client.post(PREDICT, json={"instances": EXAMPLE_ROWS}).headers["X-Cache"] == "hit"
    model, metadata = train_diabetes(n_estimators=5)
    assert model_store.save("diabetes", model, metadata) == "2"
    core.huey.enqueue(core.refresh_models.s())  # what the crontab does every minute
    wait_for(lambda: services.catalog.get("diabetes").version == "2", "the API to see version 2")
    new = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
    assert new.headers["X-Cache"] == "miss" and new.headers["X-Model-Version"] == "2"
    assert new.json()["predictions"] == model.predict(np.array(EXAMPLE_ROWS)).tolist()
    assert new.json()["predictions"] != old.json()["predictions"]


def test_sync_timeout_answers_504_and_job_completes(client: TestClient, serve_model: Any) -> None:
    gate = GateModel()
    serve_model("slow", gate, n_features=1, client=client)
    response = client.post("/v1/models/slow:predict", json={"instances": [[4]], "timeout": 0.3})
    assert response.status_code == 504
    assert gate.started.wait(10)
    job_id = response.json()["job_id"]
    assert response.headers["Location"] == f"/v1/jobs/{job_id}"
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["result"] is None
    assert running["started_at"] and running["finished_at"] is None
    gate.release.set()
    assert poll_job(client, job_id)["result"] == {"predictions": [4.0]}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"instances": [[1, 2]]}, 422, "expects 10"),
        ({"instances": [EXAMPLE_ROWS[0], [1.0]]}, 422, "instances[1] has 1 features"),
        ({"instances": [["a"] * 10]}, 422, "instances[0][0]"),
        ({"instances": [[True] * 10]}, 422, "valid number"),
        ({"instances": [[None] * 10]}, 422, "valid number"),
        ({"instances": []}, 422, "at least 1"),
        ({"instances": "abc"}, 422, "instances"),
        ({}, 422, "instances: Field required"),
        ({"instances": EXAMPLE_ROWS, "priority": 1000}, 422, "priority"),
        ({"instances": EXAMPLE_ROWS, "timeout": 999}, 422, "timeout 999s is above"),
        ({"instances": [[1e300] * 10]}, 422, "beyond"),
    ],
)
def test_bad_input_gets_clear_4xx(
    client: TestClient, body: dict[str, Any], status: int, fragment: str
) -> None:
    response = client.post(PREDICT, json=body)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_422(client: TestClient, token: str) -> None:
    raw = '{"instances": [[' + token + ", 0, 0, 0, 0, 0, 0, 0, 0, 0]]}"
    response = client.post(PREDICT, content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert "finite" in response.json()["error"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post(
        PREDICT, content=b'{"instances": [[1, 2', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "malformed JSON" in response.json()["error"]


@pytest.mark.parametrize(
    ("content_type", "body", "status", "fragment"),
    [
        ("text/plain", b'{"instances": [[1]]}', 415, "Content-Type: application/json"),
        ("application/x-www-form-urlencoded", b"instances=1", 415, "not 'application/x-www"),
        ("application/json", b"null", 422, "must be a JSON object"),
        ("application/json", b"[[1, 2]]", 422, "must be a JSON object"),
        ("application/json", b"", 422, "must be a JSON object"),
        ("application/json", b"\xff\xfe", 400, "malformed JSON"),
        ("application/json", '{"instances": [["\u00e9"]]}'.encode(), 422, "a JSON number"),
    ],
)
def test_body_that_is_not_a_json_object_is_4xx(
    client: TestClient, content_type: str, body: bytes, status: int, fragment: str
) -> None:
    response = client.post(PREDICT, content=body, headers={"Content-Type": content_type})
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]


def test_unknown_route_and_method_answer_in_our_format(client: TestClient) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404 and "GET /v1/nothing-here" in missing.json()["error"]
    assert client.get(PREDICT).status_code == 405


def test_too_many_instances_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "max_instances", 3)
    response = client.post(PREDICT, json={"instances": EXAMPLE_ROWS * 2})
    assert response.status_code == 413
    assert "limit is 3" in response.json()["error"]


def test_unknown_model_and_job_are_404(client: TestClient) -> None:
    response = client.post("/v1/models/nope:predict", json={"instances": [[1]]})
    assert response.status_code == 404 and "diabetes" in response.json()["error"]
    response = client.post("/v1/jobs", json={"model": "nope", "instances": [[1]]})
    assert response.status_code == 404
    assert client.get("/v1/jobs/not-a-job").status_code == 404


def test_health_reports_ready_with_details(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "readiness")
    assert client.get("/v2/health/ready").json() == {"ready": True}
    details = client.get("/health").json()
    assert details["models"] == {"diabetes": "1", "iris": "1"}
    assert details["redis"]["ok"] and details["redis"]["workers"]
    assert details["redis"]["queue_depth"] == 0
    assert set(details["cache"]) >= {"size", "hits", "misses", "hit_rate"}


def test_not_ready_without_a_worker(redis_conn: redis.Redis, model_store: ModelStore) -> None:
    with TestClient(main.app) as client:
        response = client.get("/v2/health/ready")
    assert response.status_code == 503
    assert response.json()["ready"] is False
    assert any("worker" in reason for reason in response.json()["reasons"])


def test_redis_down_is_fast_503_and_recovers(client: TestClient, redis_server: Any) -> None:
    cached = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "readiness")
    redis_server.stop()
    try:
        started = time.monotonic()
        response = client.post(PREDICT, json={"instances": EXAMPLE_ROWS[:1]})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert "Redis" in response.json()["error"]
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert time.monotonic() - started < 5, "an outage must not hang requests"
        # answers already cached are still served
        hit = client.post(PREDICT, json={"instances": EXAMPLE_ROWS})
        assert hit.status_code == 200 and hit.json() == cached.json()
    finally:
        redis_server.start()
    # the worker republishes its models and reports in again by itself
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "recovery", 20)
    assert client.post(PREDICT, json={"instances": EXAMPLE_ROWS[:1]}).status_code == 200


def test_stalled_redis_is_503_not_a_hang(client: TestClient, redis_server: Any) -> None:
    """A Redis that stops answering (not refusing) must not hold requests hostage."""
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = client.post(PREDICT, json={"instances": EXAMPLE_ROWS[:1]})
        assert response.status_code == 503
        assert client.get("/v2/health/ready").status_code == 503
        assert time.monotonic() - started < 5, "a stalled Redis must not hang requests"
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "recovery", 20)


def test_sync_wait_longer_than_socket_defaults(client: TestClient, serve_model: Any) -> None:
    """redis-py's default 5 s socket timeout must not cut a legitimate long wait."""
    gate = GateModel()
    serve_model("slow", gate, n_features=1, client=client)
    timer = threading.Timer(6.0, gate.release.set)
    timer.start()
    try:
        response = client.post("/v1/models/slow:predict", json={"instances": [[7]], "timeout": 12})
    finally:
        timer.cancel()
        gate.release.set()
    assert response.status_code == 200, response.text
    assert response.json()["predictions"] == [7.0]


def test_worker_started_before_redis_gets_ready(
    consumer_factory: Any, redis_server: Any, redis_conn: redis.Redis
) -> None:
    redis_server.stop()
    try:
        consumer = core.huey.create_consumer(
            workers=1, periodic=False, initial_delay=0.01, max_delay=0.05, check_worker_health=False
        )
        consumer.start()
        time.sleep(1.0)  # the heartbeat fails a beat or two
    finally:
        redis_server.start()
    try:
        wait_for(lambda: redis_conn.exists(wire.MODELS_KEY), "models published", 20)
        with TestClient(main.app) as client:
            wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "readiness", 20)
            assert client.post(PREDICT, json={"instances": EXAMPLE_ROWS}).status_code == 200
    finally:
        consumer.stop(graceful=True)


def test_openapi_docs_have_examples(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["components"]["schemas"]["PredictRequest"]["examples"]


def submit(client: TestClient, model: str, value: float, *, priority: int) -> str:
    response = client.post(
        "/v1/jobs", json={"model": model, "instances": [[value]], "priority": priority}
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_identical_requests_in_flight_share_one_task(
    client: TestClient, services: Services, serve_model: Any
) -> None:
    gate = GateModel()
    serve_model("gate", gate, n_features=1, client=client)
    enqueued = services.queue.enqueued
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(client.post, "/v1/models/gate:predict", json={"instances": [[7]]})
        assert gate.started.wait(10)
        others = [
            pool.submit(client.post, "/v1/models/gate:predict", json={"instances": [[7]]})
            for _ in range(4)
        ]
        wait_for(lambda: services.inference.cache.misses >= 5, "the four to look up the cache")
        gate.release.set()
        responses = [first.result(), *(other.result() for other in others)]
    assert [r.json()["predictions"] for r in responses] == [[7.0]] * 5
    assert [r.headers["X-Cache"] for r in responses] == ["miss"] + ["coalesced"] * 4
    assert len({r.headers["X-Job-Id"] for r in responses}) == 1
    assert gate.calls == [7.0] and services.queue.enqueued == enqueued + 1


def test_requests_sharing_a_task_share_its_error(client: TestClient, serve_model: Any) -> None:
    serve_model("broken", FlakyModel(failures=99), n_features=1, client=client)
    with ThreadPoolExecutor(3) as pool:
        calls = [
            pool.submit(client.post, "/v1/models/broken:predict", json={"instances": [[1]]})
            for _ in range(3)
        ]
        responses = [call.result() for call in calls]
    assert [r.status_code for r in responses] == [500] * 3
    assert len({r.json()["job_id"] for r in responses}) == 1


def test_metrics_in_prometheus_format(client: TestClient, serve_model: Any) -> None:
    before = scrape(client)
    rows = {"instances": [[0.01 * i] * 10 for i in range(3)]}
    for _ in range(2):  # a miss (worker computes, batch of 3 rows), then an API cache hit
        assert client.post(PREDICT, json=rows).status_code == 200
    gate = GateModel()
    serve_model("gate", gate, n_features=1, client=client)
    for value in (1, 2, 3):  # two workers busy (one blocked, one waiting), one job queued
        client.post("/v1/jobs", json={"model": "gate", "instances": [[value]], "priority": 3})
    wait_for(lambda: scrape(client).get(("hueyserve_queue_depth", (("priority", "3"),))) == 1,
             "one job queued at priority 3")  # fmt: skip
    after = scrape(client)
    gate.release.set()
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    route = "/v1/models/{name}:predict"
    assert grew("hueyserve_request_seconds_count", route=route, method="POST", status="200") == 2
    assert grew("hueyserve_cache_lookups_total", where="api", result="hit") == 1
    assert grew("hueyserve_cache_lookups_total", where="worker", result="miss") >= 1
    assert grew("hueyserve_batch_rows_bucket", model="diabetes", le="4.0") == 1
    assert grew("hueyserve_batch_rows_count", model="diabetes") == 1
    assert grew("hueyserve_task_seconds_count", task="predict", outcome="ok") >= 1
    assert grew("hueyserve_jobs_total", kind="predict", status="submitted") == 4
    assert grew("hueyserve_jobs_total", kind="predict", status="done") >= 1
    assert after[("hueyserve_tasks_running", (("task", "predict"),))] >= 1


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics as {(sample name, sorted labels): value}."""
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_a_joined_request_outlives_a_short_leader(
    client: TestClient, services: Services, serve_model: Any
) -> None:
    """The first request gives up after 0.3 s (504); the identical one that joined it waits
    as long as it asked and gets the answer."""
    gate = GateModel()
    serve_model("gate", gate, n_features=1, client=client)
    with ThreadPoolExecutor(2) as pool:
        body = {"instances": [[5]]}
        short = pool.submit(client.post, "/v1/models/gate:predict", json={**body, "timeout": 0.3})
        assert gate.started.wait(10)
        patient = pool.submit(client.post, "/v1/models/gate:predict", json=body)
        wait_for(lambda: services.inference.cache.misses >= 2, "the second request to join")
        assert short.result().status_code == 504
        gate.release.set()
        answer = patient.result()
    assert answer.status_code == 200 and answer.json()["predictions"] == [5.0]
    assert answer.headers["X-Cache"] == "coalesced"


def test_result_listener_survives_a_bad_message_and_a_killed_connection(
    client: TestClient, services: Services, redis_conn: redis.Redis
) -> None:
    listener = services.queue.results
    redis_conn.publish(listener.channel, b"\xff\xfe not a task id")
    assert redis_conn.client_kill_filter(_type="pubsub") >= 1
    wait_for(lambda: listener.connected.is_set(), "the listener to resubscribe")
    wait_for(
        lambda: client.post(PREDICT, json={"instances": [[0.5] * 10]}).status_code == 200,
        "predictions to work again",
    )


def test_a_repeated_body_is_answered_before_parsing_and_never_stale(
    client: TestClient, model_store: ModelStore
) -> None:
    """hueyserve.api.answers: the same bytes again are a hit (no job), but not when the request
    asks for something else (async, another content type) or the version changed."""
    raw = b'{"instances": [[0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]]}'
    json_type = {"Content-Type": "application/json"}
    first = client.post(PREDICT, content=raw, headers=json_type)
    again = client.post(PREDICT, content=raw, headers=json_type)
    assert first.headers["X-Cache"] == "miss" and again.headers["X-Cache"] == "hit"
    assert again.content == first.content and "X-Job-Id" not in again.headers
    versioned = client.post(
        "/v1/models/diabetes/versions/1:predict", content=raw, headers=json_type
    )
    assert versioned.headers["X-Cache"] == "hit" and versioned.content == first.content
    wrong_type = client.post(PREDICT, content=raw, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    asynchronous = client.post(
        PREDICT, content=raw, headers={**json_type, "Prefer": "respond-async"}
    )
    assert asynchronous.status_code == 202
    model, metadata = train_diabetes(n_estimators=5)
    assert model_store.save("diabetes", model, metadata) == "2"
    assert client.post("/v1/models/diabetes/reload").status_code == 200  # the newest: 2
    fresh = client.post(PREDICT, content=raw, headers=json_type)
    assert fresh.headers["X-Cache"] == "miss" and fresh.headers["X-Model-Version"] == "2"


def test_an_empty_queue_has_a_depth_series_per_default_priority(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    """Issue 11.21: with nothing queued, /metrics had no queue-depth series to plot."""
    assert redis_conn.zcard(core.huey.storage.queue_key) == 0
    depths = scrape(client)
    for priority in (settings.sync_priority, settings.async_priority, settings.train_priority):
        assert depths[("hueyserve_queue_depth", (("priority", str(priority)),))] == 0.0


def test_not_ready_until_subscribed_to_result_notifications(
    client: TestClient, services: Services
) -> None:
    """Readiness said 200 right after a Redis restart while sync calls still got 503s: the
    result listener had not subscribed again yet."""
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "readiness")
    services.queue.results.connected.clear()  # as while the listener resubscribes
    try:
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert "result notifications" in " ".join(ready.json()["reasons"])
    finally:
        services.queue.results.connected.set()
    assert client.get("/v2/health/ready").status_code == 200


def test_the_docs_page_loads_everything_from_this_server(client: TestClient) -> None:
    """Issue 11.21: /docs was blank without internet (Swagger UI came from a CDN)."""
    page = client.get("/docs")
    assert page.status_code == 200
    linked = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert linked and all(url.startswith("/") for url in linked), linked
    for url in linked:
        asset = client.get(url)
        assert asset.status_code == 200 and asset.content, url
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "'/openapi.json'" in page.text or '"/openapi.json"' in page.text
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN
