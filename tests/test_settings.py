"""Settings: environment names and messages that say what to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from hueyserve.settings import Settings


def test_redis_url_and_prefixed_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("HUEYSERVE_SECRET", "s")
    monkeypatch.setenv("HUEYSERVE_CACHE_SIZE", "7")
    configured = Settings()
    assert configured.redis_url == "redis://example:6380/2" and configured.cache_size == 7


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("REDIS_URL", "localhost:6379", "REDIS_URL must start with"),
        ("HUEYSERVE_REFRESH_CRON", "every minute", "five fields"),
        ("HUEYSERVE_RETRAIN_CRON", "nightly", "HUEYSERVE_RETRAIN_CRON needs five fields"),
        ("HUEYSERVE_WORKER_TYPE", "fiber", "thread, process or greenlet"),
        # Issue 11.17: such a key made every keyed request a 500; refuse it at start.
        ("HUEYSERVE_API_KEYS", "ok,ключ", "HUEYSERVE_API_KEYS: a key holds a character"),
        ("HUEYSERVE_ADMIN_KEYS", "a b", "HUEYSERVE_ADMIN_KEYS: a key holds a character"),
    ],
)
def test_bad_values_are_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=message):
        Settings()


def test_a_long_predict_timeout_raises_the_sync_job_ttl_unless_it_is_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HUEYSERVE_PREDICT_TIMEOUT_S", "600")
    assert Settings().sync_result_ttl_s == 600  # a deployment that started before still does
    monkeypatch.setenv("HUEYSERVE_SYNC_RESULT_TTL_S", "60")
    with pytest.raises(ValidationError, match="SYNC_RESULT_TTL_S must be at least"):
        Settings()


@pytest.mark.parametrize(
    "url", ["redis://10.0.0.5:6379/0", "rediss://redis.example.com/0", "redis://[2001:db8::1]/0"]
)
def test_a_redis_on_another_host_needs_a_secret(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Issue 11.1: without a secret, whoever reaches that Redis could forge jobs and results."""
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.delenv("HUEYSERVE_SECRET", raising=False)
    with pytest.raises(ValidationError, match="set HUEYSERVE_SECRET"):
        Settings()
    monkeypatch.setenv("HUEYSERVE_SECRET", "")  # an empty line in .env is no secret
    with pytest.raises(ValidationError, match="set HUEYSERVE_SECRET"):
        Settings()
    monkeypatch.setenv("HUEYSERVE_SECRET", "a shared secret")
    assert Settings().redis_url == url


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.2:6379/0",
        "redis://localhost/0",
        "redis://:pw@[::1]:6379/0",
        "unix:///run/redis.sock",
    ],
)
def test_a_redis_on_this_machine_needs_none(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.delenv("HUEYSERVE_SECRET", raising=False)
    assert Settings().secret is None
