"""Nothing accepted is lost, and nothing is run that nobody wants: cancellation, deadlines
and backpressure, through the real app, queue and workers."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient
from huey.exceptions import CancelExecution

import core
import main
from hueyserve import wire
from hueyserve.api.catalog import ModelCatalog
from hueyserve.dev.redis_server import EmbeddedRedis, free_port
from hueyserve.errors import ModelNotFound, ServiceUnavailable
from hueyserve.settings import settings
from tests.helpers import PREDICT, GateModel, poll_job, services_of, wait_for


class Gated(NamedTuple):
    client: TestClient
    gate: GateModel
    blocker: str  #: the job that keeps the only worker busy


@pytest.fixture
def gated(consumer_factory: Any, serve_model: Any) -> Iterator[Gated]:
    """One worker, busy with a job on the `gate` model until the test releases it."""
    consumer_factory(workers=1)
    gate = GateModel()
    with TestClient(main.app) as client:
        serve_model("gate", gate, n_features=1, client=client)
        blocker = submit(client, 0.0)
        assert gate.started.wait(10), "the only worker never started the blocking job"
        try:
            yield Gated(client, gate, blocker)
        finally:
            gate.release.set()
            poll_job(client, blocker)


def submit(client: TestClient, value: float, **fields: Any) -> str:
    body = {"model": "gate", "instances": [[value]], **fields}
    response = client.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_a_queued_job_can_be_cancelled_and_never_runs(
    gated: Gated,
) -> None:
    client, gate, _ = gated
    doomed, kept = submit(client, 1.0), submit(client, 2.0)
    cancelled = client.delete(f"/v1/jobs/{doomed}")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled" and cancelled.json()["finished_at"]
    again = client.delete(f"/v1/jobs/{doomed}")
    assert again.status_code == 409 and "cancelled" in again.json()["error"]
    gate.release.set()
    poll_job(client, kept)
    assert 1.0 not in gate.calls and 2.0 in gate.calls
    assert client.get(f"/v1/jobs/{doomed}").json()["status"] == "cancelled"


def test_running_ended_and_unknown_jobs_cannot_be_cancelled(
    gated: Gated,
) -> None:
    client, gate, running = gated
    assert client.get(f"/v1/jobs/{running}").json()["status"] == "running"
    refused = client.delete(f"/v1/jobs/{running}")
    assert refused.status_code == 409 and "running" in refused.json()["error"]
    gate.release.set()
    poll_job(client, running)
    assert client.delete(f"/v1/jobs/{running}").status_code == 409
    assert client.delete("/v1/jobs/no-such-job").status_code == 404


def test_a_job_cancelled_after_the_revoke_check_still_does_not_run(
    gated: Gated, redis_conn: redis.Redis
) -> None:
    """The race DELETE can lose to Huey's own revoke check: the record says cancelled but no
    revoke key exists. The worker's atomic start still refuses to run it."""
    client, gate, _ = gated
    job_id = submit(client, 3.0)
    redis_conn.hset(wire.job_key(job_id), "status", "cancelled")
    gate.release.set()
    later = submit(client, 4.0)
    poll_job(client, later)
    assert 3.0 not in gate.calls
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_a_job_past_its_deadline_is_not_run_and_reads_expired(
    gated: Gated,
) -> None:
    client, gate, _ = gated
    expiring = submit(client, 5.0, timeout=0.2)
    patient = submit(client, 6.0, timeout=60)
    time.sleep(0.5)
    gate.release.set()
    poll_job(client, patient)
    job = poll_job(client, expiring, status="expired")
    assert "deadline" in job["error"] and job["result"] is None
    assert 5.0 not in gate.calls and 6.0 in gate.calls


def test_a_full_queue_refuses_with_retry_after(gated: Gated) -> None:
    client = gated.client
    service = services_of(client)
    service.queue.max_depth = 2
    try:
        submit(client, 7.0, priority=5)
        submit(client, 8.0, priority=5)
        refused = client.post("/v1/jobs", json={"model": "gate", "instances": [[9]], "priority": 5})
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "HUEYSERVE_MAX_QUEUE_DEPTH" in refused.json()["error"]
        sync = client.post("/v1/models/gate:predict", json={"instances": [[10]], "priority": 1})
        assert sync.status_code == 503 and sync.headers["Retry-After"] == "1"
        # Only tasks that would run before or with it count: an urgent job still gets in.
        submit(client, 11.0, priority=90)
    finally:
        service.queue.max_depth = 0


def test_a_retried_submission_with_the_same_idempotency_key_is_the_same_job(
    gated: Gated, redis_conn: redis.Redis
) -> None:
    client, gate, _ = gated
    service = services_of(client)
    enqueued = service.queue.enqueued
    key = {"Idempotency-Key": "order-42"}
    body = {"model": "gate", "instances": [[12.0]]}
    first = client.post("/v1/jobs", json=body, headers=key)
    retried = client.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == retried.status_code == 202
    assert retried.json()["job_id"] == first.json()["job_id"]
    v1_async = client.post(
        "/v1/models/gate:predict",
        json={"instances": [[13.0]]},
        headers={"Prefer": "respond-async", "Idempotency-Key": "order-43"},
    )
    v1_again = client.post(
        "/v1/models/gate:predict",
        json={"instances": [[13.0]]},
        headers={"Prefer": "respond-async", "Idempotency-Key": "order-43"},
    )
    assert v1_again.json()["job_id"] == v1_async.json()["job_id"]
    other = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-44"})
    assert other.json()["job_id"] != first.json()["job_id"]
    assert service.queue.enqueued == enqueued + 3
    too_long = client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k" * 201})
    assert too_long.status_code == 422 and "idempotency-key" in too_long.json()["error"]
    assert redis_conn.zcard(core.huey.storage.queue_key) == 3  # the retries queued nothing
    gate.release.set()
    poll_job(client, first.json()["job_id"])


# --- worker death: leases and the reaper --------------------------------------------------


def lost_task(client: TestClient, value: float, *, deaths: int) -> str:
    """An async job as a worker that took it and died would leave it: no longer queued, its
    lease expired, its workers having died `deaths` times before."""
    service = services_of(client)
    service.queue.max_depth = 0
    job_id = submit(client, value)
    conn = core.huey.storage.conn
    entry, score = conn.zpopmin(core.huey.storage.queue_key)[0]
    assert score == -settings.async_priority
    record = {"status": "running", "attempts": deaths + 1, "lost": deaths}
    conn.hset(wire.job_key(job_id), mapping=record)  # first: a reaper may look at once
    conn.zadd(core.huey.storage.leases_key, {entry: time.time() - 1})  # expired a second ago
    return job_id


def test_a_task_whose_worker_died_is_queued_again_and_completes(gated: Gated) -> None:
    client, gate, _ = gated
    job_id = lost_task(client, 21.0, deaths=0)
    core.worker.lifecycle.reap_lost_tasks()  # what every heartbeat does
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    record = core.huey.storage.conn.hgetall(wire.job_key(job_id))
    assert b"worker_lost" in record[b"error"]  # why it runs again
    gate.release.set()
    done = poll_job(client, job_id)
    assert done["attempts"] == 2 and 21.0 in gate.calls
    wait_for(lambda: core.huey.storage.lease_count() == 0, "every lease to be given back")


def test_a_task_whose_worker_keeps_dying_fails_with_worker_lost(gated: Gated) -> None:
    client, gate, _ = gated
    job_id = lost_task(client, 22.0, deaths=settings.max_attempts - 1)
    core.worker.lifecycle.reap_lost_tasks()
    failed = client.get(f"/v1/jobs/{job_id}").json()
    assert failed["status"] == "failed" and failed["error"].startswith("worker_lost")
    conn = core.huey.storage.conn
    assert conn.zcard(core.huey.storage.queue_key) == 0  # not queued again...
    assert conn.zcard(core.huey.storage.leases_key) == 1  # ...and only the blocker is leased
    gate.release.set()
    later = submit(client, 23.0)  # same priority, so it would run after a requeued 22
    poll_job(client, later)
    assert 22.0 not in gate.calls and 23.0 in gate.calls


def test_a_task_taken_as_its_consumer_stops_is_put_back_unrun(gated: Gated) -> None:
    """SIGTERM puts a running task back; a thread of the same consumer, woken by that very
    put-back, may take it again before the process ends. It must go back unchanged, not be
    marked running (it would read running until its lease lapsed)."""
    client, gate, _ = gated
    job_id = submit(client, 24.0)
    storage, conn = core.huey.storage, core.huey.storage.conn
    (_, score), *_ = conn.zrange(storage.queue_key, 0, -1, withscores=True)
    message = storage.dequeue()  # this thread takes it, as a worker thread would...
    assert message is not None and conn.zcard(storage.queue_key) == 0
    task = core.huey.deserialize_task(message)
    storage.stopping = True  # ...as the consumer's stop begins
    try:
        with pytest.raises(CancelExecution):
            core.worker.lifecycle.start_jobs(task)
    finally:
        storage.stopping = False
    assert conn.zrange(storage.queue_key, 0, -1, withscores=True)[0][1] == score  # its place
    assert conn.zcard(storage.leases_key) == 1  # only the blocker's lease
    record = client.get(f"/v1/jobs/{job_id}").json()
    assert record["status"] == "queued" and record["attempts"] == 0
    gate.release.set()
    assert poll_job(client, job_id)["status"] == "done" and 24.0 in gate.calls


def test_running_tasks_hold_renewed_leases(gated: Gated) -> None:
    conn = core.huey.storage.conn
    (entry, until), *_ = conn.zrange(core.huey.storage.leases_key, 0, -1, withscores=True)
    assert until > time.time()  # the blocker's lease
    conn.zadd(core.huey.storage.leases_key, {entry: time.time() + 0.5})  # about to lapse
    core.huey.storage.renew()  # what the lease thread does every heartbeat interval
    assert conn.zscore(core.huey.storage.leases_key, entry) > time.time() + 5


def test_an_admin_purge_cancels_every_queued_job(gated: Gated, redis_conn: redis.Redis) -> None:
    client, gate, blocker = gated
    queued = [submit(client, float(30 + i), priority=p) for i, p in enumerate((1, 50, 90))]
    purged = client.post("/v1/queue/purge")
    assert purged.status_code == 200 and purged.json() == {"cancelled": 3}
    assert redis_conn.zcard(core.huey.storage.queue_key) == 0  # gone at once: depth drops
    gate.release.set()
    finished = poll_job(client, blocker)
    assert finished["worker"] and finished["worker"].endswith(f":{os.getpid()}")
    assert [client.get(f"/v1/jobs/{j}").json()["status"] for j in queued] == ["cancelled"] * 3
    assert not {30.0, 31.0, 32.0} & set(gate.calls)


# --- issue 11.6: no 500 for a job whose record is gone, or for a duration too long -----------


def test_a_job_whose_record_is_gone_still_reads_its_result(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    body = {"model": "diabetes", "instances": [[0.01] * 10]}
    job_id = client.post("/v1/jobs", json=body).json()["job_id"]
    done = poll_job(client, job_id)
    redis_conn.delete(wire.job_key(job_id))  # a DEL, an eviction, or the TTLs' gap
    job = client.get(f"/v1/jobs/{job_id}")
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "done"
    assert job.json()["result"] == {"outputs": {"predict": done["result"]["predictions"]}}


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/jobs", {"model": "diabetes", "timeout": 1e12}, {}),
        ("/v1/models/diabetes:predict", {"timeout": 1e12}, {"Prefer": "respond-async"}),
        ("/v2/models/diabetes/infer", {"parameters": {"timeout": 10**18}}, {}),
        (
            "/v2/models/diabetes/infer",
            {"parameters": {"timeout": 10**18}},
            {"Prefer": "respond-async"},
        ),
    ],
)
def test_a_duration_beyond_a_year_is_refused_with_a_422(
    client: TestClient, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    rows = [[0.01] * 10]
    if path.startswith("/v2"):
        tensor = {"name": "features", "datatype": "FP64", "shape": [1, 10], "data": rows}
        body = {**body, "inputs": [tensor]}
    else:
        body = {**body, "instances": rows}
    response = client.post(path, json=body, headers=headers)
    assert response.status_code == 422, response.text
    assert "timeout" in response.json()["error"]


# --- issue 11.3: a Redis that evicts keys is not a place to keep jobs ------------------------


@pytest.fixture
def evicting_redis(redis_conn: redis.Redis) -> Iterator[redis.Redis]:
    redis_conn.config_set("maxmemory-policy", "allkeys-lru")
    try:
        yield redis_conn
    finally:
        redis_conn.config_set("maxmemory-policy", "noeviction")


def test_readiness_is_false_while_redis_may_evict_keys(
    client: TestClient, evicting_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 503
    assert any("maxmemory-policy allkeys-lru" in reason for reason in ready.json()["reasons"])
    assert "noeviction" in " ".join(ready.json()["reasons"])
    with caplog.at_level(logging.ERROR, "hueyserve.worker.process"):
        core.worker.check_redis()
    assert "allkeys-lru" in caplog.text
    evicting_redis.config_set("maxmemory-policy", "noeviction")
    wait_for(lambda: client.get("/v2/health/ready").status_code == 200, "ready again")


# --- issue 11.11: Redis unreachable is a 503, not "unknown model" ---------------------------


def test_an_unknown_model_is_a_503_while_the_catalog_cannot_be_read(
    redis_server: EmbeddedRedis,
) -> None:
    async def scenario() -> None:
        dead = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
        catalog = ModelCatalog(dead, resync_s=1)
        follower = asyncio.create_task(catalog.follow())
        try:
            await asyncio.sleep(0.5)  # the first reads have failed
            with pytest.raises(ServiceUnavailable) as refused:
                catalog.get("diabetes")
            assert refused.value.status_code == 503 and "Redis" in refused.value.message
        finally:
            follower.cancel()
            await asyncio.wait({follower})
            await dead.aclose()
        live = aioredis.Redis(port=redis_server.port)
        catalog = ModelCatalog(live, resync_s=1)
        await catalog.resync()
        with pytest.raises(ModelNotFound):  # read, and not there: a real 404
            catalog.get("no-such-model")
        await live.aclose()

    asyncio.run(scenario())


def test_a_result_that_cannot_be_read_is_a_failed_job_not_a_500(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    body = {"model": "diabetes", "instances": [[0.02] * 10]}
    job_id = client.post("/v1/jobs", json=body).json()["job_id"]
    poll_job(client, job_id)
    redis_conn.set(core.huey.storage.result_key(job_id), b"not what the workers wrote")
    job = client.get(f"/v1/jobs/{job_id}")
    assert job.status_code == 200, job.text
    assert job.json()["status"] == "failed" and "cannot be read" in job.json()["error"]


# --- issue 11.2: a job survives Redis refusing writes as it ends -----------------------------


@pytest.fixture
def full_redis(redis_conn: redis.Redis) -> Iterator[Callable[[], None]]:
    """Call it to make Redis refuse writes (maxmemory far below what is used, under
    noeviction); writes are allowed again when the fixture ends (or the test calls
    `free_redis`)."""

    def fill() -> None:
        redis_conn.config_set("maxmemory", 1)
        with pytest.raises(redis.ResponseError, match="maxmemory"):
            redis_conn.set("probe", 1)

    try:
        yield fill
    finally:
        free_redis(redis_conn)


def free_redis(conn: redis.Redis) -> None:
    conn.config_set("maxmemory", 0)


def test_a_job_ending_while_redis_refuses_writes_is_run_again_once_it_accepts_them(
    gated: Gated,
    full_redis: Callable[[], None],
    redis_conn: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its result cannot be stored and its retry cannot be queued: its lease must stay, lapse
    and be reaped, not be given back with the task in neither the queue nor the leases."""
    client, gate, blocker = gated
    monkeypatch.setattr(core.huey.storage, "lease_s", 2.0)  # renewals now extend by 2 s
    core.huey.storage.renew()
    full_redis()
    gate.release.set()  # the blocker ends now: its result and its retry are refused
    # The worker thread ended the task (its writes refused) and went back for the next one:
    # it holds nothing any more, and its lease is still in Redis, no longer renewed.
    wait_for(lambda: core.huey.storage.holding() == 0, "the worker to have tried to end it")
    assert redis_conn.zcard(wire.leases_key(core.huey.storage.queue_key)) == 1
    free_redis(redis_conn)
    job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{blocker}").json())["status"] == "done" and j,
        "the job to be reaped, run again and done",
        timeout_s=30,
    )
    assert job["result"] == {"predictions": [0.0]} and job["attempts"] >= 2


def test_a_task_whose_jobs_cannot_be_marked_running_is_not_run_then(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Huey logs and ignores a pre-execute hook's error: the task ran unrecorded (attempts 0).
    Now it stops, its lease lapses, and a reaper queues it again."""
    monkeypatch.setattr(core.huey.storage, "lease_s", 2.0)
    start = core.worker.records.start
    failures = [redis.ConnectionError("Redis went away")]

    def flaky_start(*job_ids: str, **options: Any) -> bool:
        if failures:
            raise failures.pop()
        return start(*job_ids, **options)

    monkeypatch.setattr(core.worker.records, "start", flaky_start)
    body = {"model": "diabetes", "instances": [[0.03] * 10]}
    job_id = client.post("/v1/jobs", json=body).json()["job_id"]
    job = wait_for(
        lambda: (j := client.get(f"/v1/jobs/{job_id}").json())["status"] == "done" and j,
        "the job to be reaped and run",
        timeout_s=30,
    )
    assert not failures and job["attempts"] == 1


# --- issue 11.13: a delivered sync answer does not hold Redis memory for an hour -------------


def test_a_sync_request_s_job_lives_shorter_than_an_async_job(
    client: TestClient, redis_conn: redis.Redis
) -> None:
    sync = client.post(PREDICT, json={"instances": [[0.04] * 10]})
    sync_id = sync.headers["X-Job-Id"]
    async_id = client.post("/v1/jobs", json={"model": "diabetes", "instances": [[0.05] * 10]})
    async_id = poll_job(client, async_id.json()["job_id"])["job_id"]
    result_key = core.huey.storage.result_key
    for key in (wire.job_key(sync_id), result_key(sync_id)):
        assert 0 < redis_conn.ttl(key) <= settings.sync_result_ttl_s, key
    for key in (wire.job_key(async_id), result_key(async_id)):
        assert redis_conn.ttl(key) > settings.sync_result_ttl_s, key
    assert client.get(f"/v1/jobs/{sync_id}").json()["status"] == "done"


# --- issue 11.14: a blocking call with an Idempotency-Key is found again by its retry --------


def test_a_sync_retry_with_its_idempotency_key_gets_the_first_job_s_answer(
    consumer: Any, serve_model: Any
) -> None:
    """The first call gives up (504; or its API process died) while the job runs; the retry
    with the same key waits for that job instead of computing again."""
    gate = GateModel()
    with TestClient(main.app) as client:
        serve_model("gate", gate, n_features=1, client=client)
        call = {"instances": [[7.0]], "timeout": 0.5}
        key = {"Idempotency-Key": "order-17"}
        first = client.post("/v1/models/gate:predict", json=call, headers=key)
        assert first.status_code == 504 and gate.started.is_set()
        job_id = first.json()["job_id"]
        gate.release.set()
        retry = client.post("/v1/models/gate:predict", json={**call, "timeout": 10}, headers=key)
        assert retry.status_code == 200, retry.text
        assert retry.json()["predictions"] == [7.0]
        assert retry.headers["X-Job-Id"] == job_id and retry.headers["X-Cache"] == "repeat"
        again = client.post("/v1/models/gate:predict", json=call, headers=key)
        assert again.headers["X-Job-Id"] == job_id and again.json()["predictions"] == [7.0]
        reused = client.post(
            "/v1/models/gate:predict", json={"instances": [[7.0], [1.0]]}, headers=key
        )
        assert reused.status_code == 409 and "Idempotency-Key" in reused.json()["error"]
        other, fresh_key = {"instances": [[8.0]]}, {"Idempotency-Key": "order-18"}
        fresh = client.post("/v1/models/gate:predict", json=other, headers=fresh_key)
        assert fresh.status_code == 200 and fresh.headers["X-Job-Id"] != job_id
    assert gate.calls == [7.0, 8.0]  # 7.0 computed once, however often it was asked
