"""Job events: the Redis Stream written with every job record change, and the server-sent
streams (and WebSocket) that push it to clients, resumable without a gap or a duplicate.

Answers that come before a stream (404, 401, 204) and the stream of a finished job (finite)
are read through the in-process app; live streams, an API restarted and a Redis restarted
under them go through real processes (tests.stacks.FaultStack).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx
import numpy as np
import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from sklearn.base import clone
from sklearn.datasets import load_diabetes
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

import main
from hueyserve.api.activity import Activity
from hueyserve.api.events import Event
from hueyserve.sse import ServerEvent, events
from hueyserve.wire import EVENTS_KEY
from hueyserve.worker import progress
from hueyserve.worker.progress import Progress
from tests.helpers import ROOT, FlakyModel, GateModel, poll_job, wait_for
from tests.stacks import FaultStack

ROW = [0.01] * 10


def read_stream(
    client: TestClient | httpx.Client, url: str, **headers: str | bytes
) -> list[ServerEvent]:
    """A finite stream's events (those with data)."""
    with client.stream("GET", url, headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [e for e in events(response.iter_lines()) if e.data]


def submit(client: TestClient | httpx.Client, **body: Any) -> str:
    response = client.post("/v1/jobs", json={"model": "diabetes", "instances": [ROW]} | body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


# --- answered before the stream -----------------------------------------------------------------


def test_a_finished_job_answers_its_state_then_204_once_seen(client: TestClient) -> None:
    job_id = submit(client)
    poll_job(client, job_id)
    (only,) = read_stream(client, f"/v1/jobs/{job_id}/events")
    state = orjson.loads(only.data)
    assert state["event"] == "state" and state["status"] == "done" and state["final"] is True
    assert state["result"] == client.get(f"/v1/jobs/{job_id}").json()["result"]
    assert only.id is not None
    # EventSource reconnects with the id it saw: 204 tells it to stop for good.
    again = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": only.id})
    assert again.status_code == 204 and again.content == b""
    # An id that is no stream id (not ASCII digits, past 64 bits) is taken as none.
    for odd in ("1\u00b2-0".encode("latin-1"), f"{2**64}-0".encode(), b"x"):
        (state_again,) = read_stream(client, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": odd})
        assert orjson.loads(state_again.data)["event"] == "state"


def test_unknown_jobs_are_404_and_keys_are_checked_before_the_stream(keyed: TestClient) -> None:
    for path in ("/v1/jobs/some-id/events", "/v1/events"):
        refused = keyed.get(path)
        assert refused.status_code == 401, path
        assert refused.headers["content-type"] == "application/json"
    missing = keyed.get("/v1/jobs/no-such-job/events", headers={"X-API-Key": "p-key"})
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert "no job" in missing.json()["error"]


def test_every_state_change_is_an_event_written_with_its_record(
    consumer_factory: Any, serve_model: Any, redis_conn: redis.Redis
) -> None:
    """Each job's events in the stream, in order, each showing the record as the change
    left it: one that ran, one cancelled while queued, one retried after a failure."""
    consumer_factory(workers=1)
    gate, flaky = GateModel(), FlakyModel(failures=1)
    with TestClient(main.app) as client:
        serve_model("gate", gate, n_features=1, client=client)
        serve_model("flaky", flaky, n_features=1, client=client)
        ran = submit(client, model="gate", instances=[[1.0]])
        assert gate.started.wait(10)
        cancelled = submit(client, model="gate", instances=[[2.0]])
        assert client.delete(f"/v1/jobs/{cancelled}").status_code == 200
        gate.release.set()
        retried = submit(client, model="flaky", instances=[[3.0]])
        poll_job(client, ran)
        poll_job(client, retried, timeout_s=20)
        # The split of each job's latency, as Prometheus histograms (workers in this process).
        scraped = client.get("/metrics").text
    first = job_events(redis_conn, ran)
    assert [e["event"] for e in first] == ["queued", "running", "done"]
    assert [e["status"] for e in first] == ["queued", "running", "done"]
    assert all(e["kind"] == "predict" and e["model"] == "gate" for e in first)
    assert first[1]["worker"] and float(first[2]["run_s"]) >= 0 <= float(first[2]["queued_s"])
    assert [e["event"] for e in job_events(redis_conn, cancelled)] == ["queued", "cancelled"]
    again = [e["event"] for e in job_events(redis_conn, retried)]
    assert again == ["queued", "running", "retrying", "running", "done"], again
    assert "flaky failure 1" in job_events(redis_conn, retried)[2]["error"]
    for histogram in ("hueyserve_job_queue_seconds", "hueyserve_job_run_seconds"):
        counted = re.search(rf'{histogram}_count{{kind="predict"}} (\S+)', scraped)
        assert counted is not None and float(counted.group(1)) >= 3, histogram


def job_events(conn: redis.Redis, job_id: str) -> list[dict[str, str]]:
    found = []
    for _, raw in conn.xrange(EVENTS_KEY):
        entry = {k.decode(): v.decode() for k, v in raw.items()}
        if entry.get("job") == job_id:
            found.append(entry)
    return found


@pytest.mark.parametrize(
    "estimator",
    [
        RandomForestRegressor(n_estimators=25, random_state=3),
        GradientBoostingRegressor(n_estimators=20, subsample=0.7, random_state=3),
    ],
)
def test_an_ensemble_is_fitted_in_steps_to_the_same_model(estimator: Any) -> None:
    """Progress while fitting: a tree ensemble grows in tenths (warm_start), reported after
    each, and ends as the same model one fit makes, with its parameters as they were."""
    x, y = load_diabetes(return_X_y=True)
    reported: list[tuple[str, float | None]] = []

    class Recorded(Progress):
        def __call__(self, stage: str, fraction: float | None = None) -> None:
            reported.append((stage, fraction))

    stepped = clone(estimator)
    progress.fit(stepped, x, y, Recorded("redis://unused", "job", ttl_s=1, events_max_len=1000))
    once = clone(estimator).fit(x, y)
    assert np.array_equal(stepped.predict(x), once.predict(x))
    assert stepped.get_params() == estimator.get_params()
    fractions = [fraction for _, fraction in reported]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and len(fractions) == 11
    assert fractions == sorted(fractions)


# --- live streams on real processes -------------------------------------------------------------


@dataclass
class Follower:
    """A client of an event stream that reconnects as EventSource does (with the last id it
    saw) until told to stop or answered 204; what it received, in order."""

    url: str
    received: list[ServerEvent] = field(default_factory=list)
    connections: int = 0
    last_id: str | None = None
    ended_with_204: bool = False
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            headers = {} if self.last_id is None else {"Last-Event-ID": self.last_id}
            try:
                timeout = httpx.Timeout(5.0, read=3.0)
                with httpx.stream("GET", self.url, headers=headers, timeout=timeout) as response:
                    if response.status_code == 204:
                        self.ended_with_204 = True
                        return
                    if response.status_code != 200:
                        raise AssertionError(f"{self.url}: {response.status_code}")
                    self.connections += 1
                    for event in events(response.iter_lines()):
                        self.last_id = event.id or self.last_id
                        if event.data:
                            self.received.append(event)
                        if self.stop.is_set():
                            return
            except httpx.HTTPError:
                pass  # the server went away or is idle: reconnect, as a browser does
            time.sleep(0.2)

    @classmethod
    def start(cls, url: str) -> tuple[Follower, threading.Thread]:
        follower = cls(url)
        thread = threading.Thread(target=follower.run, daemon=True)
        thread.start()
        return follower, thread


@pytest.fixture
def stack(faults: FaultStack) -> Iterator[FaultStack]:
    faults.add_consumer()
    wait_for(faults.ready, "the stack to be ready", timeout_s=60)
    yield faults


def test_a_training_s_stream_shows_its_stages_and_resumes_without_gap_or_duplicate(
    stack: FaultStack,
) -> None:
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        body = {"estimator": "RandomForestRegressor", "params": {"n_estimators": 60}}
        accepted = api.post("/v1/models/diabetes/train", json=body)
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        url = f"/v1/jobs/{job_id}/events"
        full = read_stream(api, url)
    datas = [orjson.loads(e.data) for e in full]
    assert datas[0]["event"] == "state" and datas[-1]["final"] is True
    assert datas[-1]["status"] == "done" and datas[-1]["result"]["model_version"]
    stages = [d["stage"] for d in datas if d["event"] == "progress"]
    wanted = ["data loaded", "fitting", "scored", "saved", "loaded", "published"]
    assert [s for s in dict.fromkeys(stages)] == wanted, stages
    fractions = [d["progress"] for d in datas if d.get("stage") == "fitting" and "progress" in d]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # steps: test_fit_in_steps
    ids = [e.id for e in full]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, str(i).split("-")))), ids
    assert len(set(ids)) == len(ids)
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        # From the middle: exactly the rest (the events after that id), nothing twice.
        middle = len(full) // 2
        rest = read_stream(api, url, **{"Last-Event-ID": str(full[middle].id)})
        assert [(e.id, e.data) for e in rest] == [(e.id, e.data) for e in full[middle + 1 :]]
        assert api.get(url, headers={"Last-Event-ID": str(full[-1].id)}).status_code == 204
        # A made-up id from the future is taken as none (it would hide every event).
        (state,) = read_stream(api, url, **{"Last-Event-ID": "99999999999999-0"})
        assert orjson.loads(state.data)["final"] is True


@pytest.mark.parametrize("restart", ["api", "redis"])
def test_a_restart_mid_stream_loses_no_event_and_repeats_none(
    stack: FaultStack, restart: str
) -> None:
    """Followers of the deployment stream and of one job's stream reconnect across a
    restart of the API process or of Redis; every job's queued/running/done arrives once."""
    jobs: list[str] = []
    everything, all_thread = Follower.start(f"{stack.base}/v1/events")
    wait_for(lambda: everything.connections, "the follower to connect", timeout_s=15)

    def submit_some(n: int) -> None:
        with httpx.Client(base_url=stack.base, timeout=10) as api:
            for _ in range(n):
                jobs.append(submit(api))

    submit_some(15)
    if restart == "api":
        stack.restart_api()
    else:
        stack.redis.stop()
        # A stream asked for meanwhile is a 200 that says when to come back, never a 503
        # (EventSource gives up for good on one).
        down = httpx.get(f"{stack.base}/v1/jobs/{jobs[0]}/events", timeout=10)
        assert down.status_code == 200 and "retry: " in down.text, down.text
        stack.redis.start()  # same port, same append-only file
        wait_for(stack.ready, "the stack to be ready again", timeout_s=30)
    submit_some(15)

    def all_done() -> bool:
        seen = {(d["job_id"], d["event"]) for d in datas_of(everything) if d["type"] == "job"}
        return all((job, "done") in seen for job in jobs)

    try:
        wait_for(all_done, "every job's done event", timeout_s=60)
    finally:
        everything.stop.set()
        all_thread.join(timeout=10)
    if restart == "api":  # a Redis restart need not end it: the API reads on where it was
        assert everything.connections >= 2, "the restart should have ended the first stream"
    ids = [e.id for e in everything.received]
    assert len(ids) == len(set(ids)), "an event arrived twice"
    # Exactly the stream's events of these jobs, in order: a restart may add real changes (a
    # job retried after Redis went away under it), never a gap or a repeat.
    received: dict[str, list[str]] = {job: [] for job in jobs}
    for event in everything.received:
        job = orjson.loads(event.data).get("job_id")
        if job in received:
            received[job].append(str(event.id))
    written: dict[str, list[str]] = {job: [] for job in jobs}
    for raw_id, raw in stack.conn().xrange(EVENTS_KEY):
        job = raw.get(b"job", b"").decode()
        if job in written:
            written[job].append(raw_id.decode())
    assert received == written
    assert all(len(events) >= 3 for events in written.values())  # queued, running, done
    print(f"\n{restart} restarted: {len(ids)} events over {everything.connections} connections")


def datas_of(follower: Follower) -> list[dict[str, Any]]:
    return [orjson.loads(e.data) for e in list(follower.received)]


def test_the_websocket_twin_sends_the_same_json_and_checks_the_origin(stack: FaultStack) -> None:
    ws_base = stack.base.replace("http://", "ws://")
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        body = {"estimator": "RandomForestRegressor", "params": {"n_estimators": 60}}
        job_id = api.post("/v1/models/diabetes/train", json=body).json()["job_id"]
        url = f"{ws_base}/v1/jobs/{job_id}/events"
        with connect(url, origin=stack.base) as socket:  # a page of this server's own
            messages = [orjson.loads(m) for m in socket]  # until it closes
            assert socket.close_code == 1000
        assert messages[0]["event"] == "state" and messages[-1]["final"] is True
        assert messages[-1]["result"]["model_version"]
        # The SSE stream resumed after the first message has exactly the rest, same JSON.
        rest = read_stream(api, f"/v1/jobs/{job_id}/events", **{"Last-Event-ID": messages[0]["id"]})
        assert [{"id": e.id, **orjson.loads(e.data)} for e in rest] == messages[1:]
    with pytest.raises(InvalidStatus) as refused:  # another site's page: no socket
        connect(url, origin="https://elsewhere.example").close()
    assert refused.value.response.status_code == 403
    with connect(f"{ws_base}/v1/jobs/no-such-job/events") as socket:
        with pytest.raises(ConnectionClosed):
            socket.recv(timeout=10)
        assert socket.close_code == 4404


def test_the_command_line_follows_a_training_to_its_end(stack: FaultStack) -> None:
    params = '{"n_estimators": 80}'
    command = [sys.executable, "-m", "hueyserve", "--url", stack.base, "train", "diabetes"]
    done = subprocess.run(
        [*command, "--estimator", "RandomForestRegressor", "--params", params],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout)
    assert job["status"] == "done" and job["stage"] == "published" and job["model_version"] == "2"
    lines = [line.split(": ", 1)[1] for line in done.stderr.splitlines() if ": " in line]
    wanted = ["data loaded", "fitting", "scored", "saved", "loaded", "published", "done"]
    assert lines == wanted, done.stderr
    predicted = subprocess.run(
        [sys.executable, "-m", "hueyserve", "--url", stack.base, "--quiet", "predict", "iris",
         "[[5.1, 3.5, 1.4, 0.2]]"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["result"]["predictions"][0]["class"] == "setosa"
    assert predicted.stderr == ""


def test_a_resume_from_a_trimmed_id_gets_a_reset_then_the_live_events(stack: FaultStack) -> None:
    with httpx.Client(base_url=stack.base, timeout=30) as api:
        submit(api)  # the stream has entries; "1-0" is older than the oldest
        timeout = httpx.Timeout(10.0, read=20.0)
        with api.stream(
            "GET", "/v1/events", headers={"Last-Event-ID": "1-0"}, timeout=timeout
        ) as r:
            assert r.status_code == 200
            got = events(r.iter_lines())
            reset = next(e for e in got if e.data)
            assert reset.event == "reset" and "trimmed" in orjson.loads(reset.data)["reason"]
            job_id = submit(api)  # and then it goes on, live
            for event in got:
                if event.data and orjson.loads(event.data).get("job_id") == job_id:
                    break


def test_the_activity_window_gives_percentiles_and_rates() -> None:
    """The dashboard's numbers from a known set of events: 100 jobs done with queue waits
    of 1..100 ms and run times of 10..1000 ms, 5 failed, 10 retried."""
    window = Activity()
    now_ms = int(time.time() * 1000)

    def event(n: int, **fields: str) -> Event:
        return Event(f"{now_ms - 1000 + n}-0", {"type": "job", "job": f"j{n}", **fields})

    for n in range(1, 101):
        window.observe(event(n, event="queued", status="queued"))
        done = {"event": "done", "status": "done", "queued_s": str(n / 1000), "run_s": str(n / 100)}
        window.observe(event(n, **done))
    for n in range(101, 106):
        window.observe(event(n, event="failed", status="failed", queued_s="0", run_s="0"))
    for n in range(106, 116):
        window.observe(event(n, event="retrying", status="queued"))
    summary = window.summary()
    assert summary["counts"]["done"] == 100 and summary["counts"]["failed"] == 5
    wait, run = summary["latency_s"]["queue_wait"], summary["latency_s"]["run"]
    assert wait["samples"] == run["samples"] == 105
    assert wait["p50"] == pytest.approx(np.percentile([*range(1, 101), 0, 0, 0, 0, 0], 50) / 1000)
    assert run["p99"] == pytest.approx(np.percentile([*range(1, 101), 0, 0, 0, 0, 0], 99) / 100)
    assert summary["error_rate"] == pytest.approx(5 / 105, abs=1e-4)
    assert summary["retry_rate"] == pytest.approx(10 / 105, abs=1e-4)
    assert summary["throughput_per_s"] == pytest.approx(100 / summary["window_s"], abs=1e-3)
    assert summary["recent_jobs"][0]["job_id"] == "j115" and len(summary["recent_jobs"]) == 50
