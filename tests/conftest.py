"""Test session: a real redis-server on a free port, real Huey consumers, the real app.

The environment is set here, at import, before anything imports `core` or `main`: both read
settings when imported.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hypothesis.configuration
import pytest
import redis

from hueyserve.dev.redis_server import EmbeddedRedis, free_port

SESSION_DIR = Path(tempfile.mkdtemp(prefix="hueyserve-tests-"))
REDIS_PORT = free_port()
os.environ.update(
    {
        "REDIS_URL": f"redis://127.0.0.1:{REDIS_PORT}/0",
        "HUEYSERVE_MODEL_DIR": str(SESSION_DIR / "models"),
        "HUEYSERVE_DATASET_DIR": str(SESSION_DIR / "datasets"),
        "HUEYSERVE_LOG_DIR": str(SESSION_DIR / "logs"),
        "HUEYSERVE_HEARTBEAT_INTERVAL_S": "0.5",
        "HUEYSERVE_HEARTBEAT_TTL_S": "3",
        "HUEYSERVE_CATALOG_RESYNC_S": "1",
        "HUEYSERVE_PREDICT_TIMEOUT_S": "15",
    }
)


def import_plugin_modules(*packages: str) -> None:
    """Import every module of these pytest plugins now, while no other thread runs. pytest
    rewrites a plugin's modules with ast.parse as they are first imported, and CPython 3.11's
    AST builder is not thread safe: a module that anyio or schemathesis imports lazily during a
    test, while a worker thread parses too (numpy reads each array's header of a skops file
    with ast.literal_eval), failed runs with "AST constructor recursion depth mismatch"."""
    for package in packages:
        for module in pkgutil.walk_packages(
            importlib.import_module(package).__path__, package + "."
        ):
            with contextlib.suppress(Exception):  # an optional dependency that is not there
                importlib.import_module(module.name)


import_plugin_modules("anyio", "schemathesis")
# Hypothesis (under schemathesis) keeps caches in ./.hypothesis: in the session's folder instead.
hypothesis.configuration.set_hypothesis_home_dir(SESSION_DIR / "hypothesis")

from fastapi.testclient import TestClient

import core
import main
from hueyserve.api.guard import RequestGuard
from hueyserve.api.services import Services
from hueyserve.models import ModelEntry
from hueyserve.settings import settings
from hueyserve.wire import MODELS_KEY
from hueyserve.worker.fitting import ensure_demo_models
from hueyserve.worker.publishing import publish
from hueyserve.worker.registry import LoadedModel
from hueyserve.worker.store import ModelStore
from tests.helpers import services_of, wait_for
from tests.stacks import faults  # noqa: F401 (a fixture, for every test module)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Also when no test ran (a collection error): leave no session folder behind."""
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def redis_server() -> Iterator[EmbeddedRedis]:
    """One throw-away redis-server for the session (no persistence)."""
    server = EmbeddedRedis(port=REDIS_PORT)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture
def redis_conn(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    """A client on the session server, flushed before and after each test."""
    conn = redis.Redis(port=redis_server.port)
    conn.flushall()
    try:
        yield conn
    finally:
        if redis_server.process is not None and redis_server.process.poll() is None:
            conn.flushall()
        conn.close()


@pytest.fixture(scope="session")
def demo_models() -> Path:
    """The demo models trained once per session; tests get copies."""
    root = SESSION_DIR / "demo-models"
    ensure_demo_models(ModelStore(root), SESSION_DIR / "datasets")
    return root


@pytest.fixture
def model_store(demo_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    """A private copy of the demo store behind the worker's store, and empty in-process caches."""
    root = tmp_path / "models"
    shutil.copytree(demo_models, root)
    monkeypatch.setattr(core.worker.store, "root", root)
    core.worker.registry.clear()
    core.worker.cache.clear()
    return core.worker.store


@pytest.fixture
def consumer_factory(
    redis_conn: redis.Redis, model_store: ModelStore
) -> Iterator[Callable[..., Any]]:
    """Start Huey's own consumer in this process; stopped gracefully at the end of the test."""
    started = []
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def start(workers: int = 2) -> Any:
        consumer = core.huey.create_consumer(
            workers=workers,
            periodic=False,
            initial_delay=0.001,
            max_delay=0.01,
            scheduler_interval=1,
            check_worker_health=False,
        )
        consumer.start()
        started.append(consumer)
        # Every model in the store, not just the first: each is checked (loaded, a smoke
        # prediction) before it is published, so they arrive one after the other.
        wanted = set(model_store.names())
        wait_for(
            lambda: (
                redis_conn.exists(MODELS_KEY)
                and {k.decode() for k in redis_conn.hkeys(MODELS_KEY)} >= wanted
            ),
            "the worker published its models",
        )
        return consumer

    yield start
    for consumer in started:
        consumer.stop(graceful=True)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture
def consumer(consumer_factory: Callable[..., Any]) -> Any:
    return consumer_factory(workers=2)


@pytest.fixture
def client(consumer: Any) -> Iterator[TestClient]:
    """The real app (lifespan included) with two in-process workers behind it."""
    with TestClient(main.app) as test_client:
        yield test_client


@pytest.fixture
def keyed(consumer: Any) -> Iterator[TestClient]:
    """The real app behind a guard with one predict key (p-key) and one admin key (a-key)."""
    guarded = RequestGuard(
        main.app,
        predict_keys=frozenset({"p-key"}),
        admin_keys=frozenset({"a-key"}),
        max_body_bytes=settings.max_body_bytes,
    )
    with TestClient(guarded) as client:
        yield client


@pytest.fixture
def services(client: TestClient) -> Services:
    """The API process's services behind `client` (its queue, catalog, caches)."""
    return services_of(client)


@pytest.fixture
def serve_model(
    redis_conn: redis.Redis,
) -> Iterator[Callable[..., None]]:
    """Serve a test-only in-memory model through the real queue: register it in this process's
    workers and publish it, as the refresh task would for a model on disk."""
    names = []

    def serve(name: str, estimator: Any, *, n_features: int, client: TestClient) -> None:
        metadata = {"n_features": n_features, "features": [f"x{i}" for i in range(n_features)]}
        core.worker.registry.register(LoadedModel.from_estimator(name, "1", estimator, metadata))
        publish(redis_conn, ModelEntry(name, "1", {"1": metadata}))
        names.append(name)
        catalog = services_of(client).catalog
        wait_for(lambda: name in catalog.models, f"the API sees model {name!r}")

    yield serve
    for name in names:
        core.worker.registry.unregister(name)
