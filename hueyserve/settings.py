"""All configuration, read once from the environment (and an optional `.env` file).

Every setting is listed in the README. Names are the field names upper-cased with the
`HUEYSERVE_` prefix, except `REDIS_URL`, which keeps its conventional name.

The module is over 300 lines on purpose: every setting with its description and checks in one
class, the one place the environment is read.
"""

from __future__ import annotations

import ipaddress
import math
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Typed settings; one instance, `settings`, is shared by every module."""

    model_config = SettingsConfigDict(env_prefix="HUEYSERVE_", env_file=".env", extra="ignore")

    # --- Redis ---------------------------------------------------------------------------
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("REDIS_URL", "HUEYSERVE_REDIS_URL"),
        description="Redis server for the queue, results and job records.",
    )
    embedded_redis_port: int = Field(
        6399, description="`make run` without REDIS_URL: port of the embedded redis-server."
    )
    embedded_redis_maxmemory: str = Field(
        "1gb",
        pattern=r"(?i)^[0-9]+(b|k|kb|m|mb|g|gb)?$",
        description="`make run` without REDIS_URL: the embedded Redis's memory limit (with "
        "noeviction: past it, submissions are refused, never silently dropped); 0: none.",
    )
    redis_connect_timeout_s: float = Field(0.5, gt=0, description="TCP connect timeout to Redis.")
    redis_socket_timeout_s: float = Field(
        1.0, gt=0, description="API side: longest wait for a Redis reply before answering 503."
    )

    redis_max_connections: int = Field(
        32, ge=4, description="API process: Redis connections shared by all its requests."
    )
    redis_pool_timeout_s: float = Field(
        5.0, gt=0, description="API: longest wait for a free connection when all are busy."
    )

    # --- Queue ---------------------------------------------------------------------------
    queue_name: str = Field("hueyserve", description="Huey queue name; separates deployments.")
    result_ttl_s: int = Field(3600, gt=0, description="How long results and job records live.")
    sync_result_ttl_s: int = Field(
        300,
        gt=0,
        description="How long a sync request's job record and result live: its caller has the "
        "answer already, or reads the job soon after a 504 (at least HUEYSERVE_PREDICT_TIMEOUT_S).",
    )
    predict_timeout_s: float = Field(30.0, gt=0, description="Default and maximum sync wait.")
    events_max_len: int = Field(
        100_000,
        ge=1000,
        description="The event stream (hueyserve:events) keeps about this many entries, about "
        "three per job: a client resumes from an id still in it; older ones get a reset.",
    )
    events_keepalive_s: float = Field(
        15.0, gt=0, description="API: a comment line on an idle event stream this often."
    )

    max_queue_depth: int = Field(
        10_000,
        ge=0,
        description="Backpressure: past this many queued tasks that would run before or with "
        "a new one, job submissions get 429 and sync calls 503 (0: no limit).",
    )
    sync_priority: int = Field(10, description="Default priority of blocking predicts.")
    async_priority: int = Field(5, description="Default priority of async jobs.")
    train_priority: int = Field(0, description="Priority of training jobs (below everything).")
    retries: int = Field(2, ge=0, description="Retries of a failed predict task.")
    retry_delay_s: float = Field(1.0, ge=0, description="Delay before the first retry.")
    retry_backoff: float = Field(2.0, ge=1, description="Each retry waits this many times longer.")

    # --- Workers -------------------------------------------------------------------------
    workers: int = Field(
        8, ge=1, description="Worker threads of the consumer `make run` starts (batch width)."
    )
    worker_type: str = Field("thread", description="Huey worker type: thread, process or greenlet.")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a worker reports in.")
    heartbeat_ttl_s: float = Field(10.0, gt=0, description="A worker silent this long is gone.")
    lease_s: float = Field(
        10.0,
        gt=0,
        description="A running task's lease, renewed every heartbeat; a task whose lease "
        "expired lost its worker and is queued again.",
    )
    max_attempts: int = Field(
        3, ge=1, description="Most starts of a task whose worker keeps dying (then worker_lost)."
    )

    # --- Batching (per worker process) ---------------------------------------------------
    batch_max_rows: int = Field(
        1024,
        ge=1,
        description="Most rows in one batched predict call (worker), and in one group of sync "
        "requests (API); 1 turns batching off.",
    )
    group_max_in_flight: int = Field(
        2,
        ge=0,
        description="API process: sync requests of one model version and priority travel as "
        "one task (a group) per event-loop turn; while this many groups await answers, new "
        "requests join the next group until one is answered (0: no limit).",
    )
    batch_max_wait_ms: float = Field(
        0.0, ge=0, description="How long a batch may wait for more tasks (0: take what waits)."
    )
    batch_adaptive: bool = Field(False, description="AIMD on the batch size toward the target.")
    batch_target_ms: float = Field(
        50.0, gt=0, description="Adaptive batching: latency target of one predict call."
    )

    # --- Models and cache ----------------------------------------------------------------
    model_dir: Path = Field(
        Path("models"),
        description="Workers: this host's model folder, <dir>/<name>/<version>/: a cache of the "
        "catalog in Redis, and where a folder dropped by hand is imported from.",
    )
    max_artifact_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1024,
        description="Largest model import through Redis, all files together (413 past); "
        "larger models come from a URI (metadata `uri`).",
    )
    trusted_types: str = Field(
        "",
        description="Comma-separated extra types a skops file may hold (e.g. a custom "
        "transformer's module.Class); only for model files whose origin you trust.",
    )
    allow_python_models: bool = Field(
        False,
        description="Workers: serve `python` runtime models, whose model.py runs in the worker "
        "with its rights. Off: such models are refused.",
    )
    import_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="API: how long an import or a delete waits for the worker that checks it.",
    )
    refresh_cron: str = Field("* * * * *", description="Crontab (m h dom mon dow): refresh.")
    cache_size: int = Field(10_000, ge=0, description="LRU entries (API and each worker); 0 = off.")
    max_sync_waiters: int = Field(
        10_000, ge=1, description="API process: most sync calls waiting at once (503 past)."
    )
    max_instances: int = Field(1000, ge=1, description="Most rows per request (413 past).")
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="API: a request's headers must arrive within this long (408 past; with "
        "uvicorn's `--http hueyserve.api.protocol:TimedHttpProtocol`, as `make run` runs it).",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="API: a request's body must arrive within this long (408)."
    )
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest request body in bytes (413 past)."
    )

    # --- Security --------------------------------------------------------------------------
    api_keys: str = Field(
        "", description="Comma-separated keys that may predict and use jobs (empty: no keys)."
    )
    admin_keys: str = Field(
        "", description="Comma-separated keys that may also train and reload models."
    )
    secret: SecretStr | None = Field(
        None,
        description="HMAC key signing every task message and result; the same on the API and "
        "every worker. `make run` creates one in data/secret. Unset: nothing is signed, and a "
        "Redis on another host is refused.",
    )
    catalog_resync_s: float = Field(5.0, gt=0, description="API: full reread of active models.")

    # --- Training ------------------------------------------------------------------------
    dataset_dir: Path = Field(
        Path("datasets"), description="CSV files a training job may name (`dataset`)."
    )
    train_niceness: int = Field(
        10, ge=0, le=19, description="Training runs in a child process this much nicer (Unix)."
    )
    train_timeout_s: float = Field(
        3600.0, gt=0, description="A training job running longer is stopped and fails."
    )
    retrain_cron: str = Field(
        "", description="Crontab for retraining models whose data changed; empty = off."
    )
    retrain_models: str = Field(
        "", description="Comma-separated models the scheduled retrain covers; empty = all."
    )

    # --- Pages ------------------------------------------------------------------------------
    session_ttl_s: int = Field(
        3600,
        ge=60,
        description="With API keys: how long a dashboard's session cookie (which stands for "
        "the key typed into the page) is valid.",
    )
    allowed_origins: str = Field(
        "",
        description="Comma-separated origins (https://ops.example.com) whose pages may open "
        "this API's WebSockets, besides its own.",
    )

    # --- Logs ------------------------------------------------------------------------------
    log_dir: Path = Field(Path("logs"), description="Rotating log files go here.")
    task_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = Field(
        None,
        description="Workers: level of the `huey` logger, which writes two INFO lines per task "
        "(WARNING drops them, as `huey_consumer -q` does). Unset: the consumer's own.",
    )

    def runtime_options(self) -> dict[str, Any]:
        """What the runtimes may read of the settings (hueyserve.worker.runtimes)."""
        return {
            "trusted_types": [t.strip() for t in self.trusted_types.split(",") if t.strip()],
            "allow_python": self.allow_python_models,
        }

    def keys(self, scope: str) -> frozenset[str]:
        """The configured keys of a scope ("api" or "admin")."""
        raw = self.api_keys if scope == "api" else self.admin_keys
        return frozenset(key.strip() for key in raw.split(",") if key.strip())

    def origins(self) -> frozenset[str]:
        """The origins HUEYSERVE_ALLOWED_ORIGINS lists."""
        return frozenset(
            o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()
        )

    @model_validator(mode="after")
    def _check_sync_ttl(self) -> Settings:
        if self.sync_result_ttl_s < self.predict_timeout_s:
            if "sync_result_ttl_s" not in self.model_fields_set:  # the default: follow it
                self.sync_result_ttl_s = math.ceil(self.predict_timeout_s)
                return self
            raise ValueError(
                "HUEYSERVE_SYNC_RESULT_TTL_S must be at least HUEYSERVE_PREDICT_TIMEOUT_S: a "
                "sync caller that timed out must still find its job"
            )
        return self

    @model_validator(mode="after")
    def _check_lease(self) -> Settings:
        if self.lease_s < 3 * self.heartbeat_interval_s:
            raise ValueError(
                "HUEYSERVE_LEASE_S must be at least 3 x HUEYSERVE_HEARTBEAT_INTERVAL_S (leases "
                "are renewed that often; a shorter one lapses while its task runs)"
            )
        return self

    @field_validator("api_keys", "admin_keys")
    @classmethod
    def _check_keys(cls, value: str, info: ValidationInfo) -> str:
        # A key travels in an HTTP header: printable ASCII, no spaces (commas separate keys).
        for key in value.split(","):
            if not all("!" <= char <= "~" for char in key.strip()):
                raise ValueError(
                    f"HUEYSERVE_{str(info.field_name).upper()}: a key holds a character that "
                    "cannot travel in an HTTP header; use printable ASCII without spaces "
                    "(for example `openssl rand -hex 32`)"
                )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {value!r}"
            )
        return value

    @field_validator("secret", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        """`HUEYSERVE_SECRET=` (an empty line in .env) means no secret, not an empty key."""
        return None if isinstance(value, str) and not value.strip() else value

    def secret_value(self) -> str | None:
        return self.secret.get_secret_value() if self.secret is not None else None

    @model_validator(mode="after")
    def _check_remote_redis_has_a_secret(self) -> Self:
        host = urlsplit(self.redis_url).hostname
        if self.secret is None and host is not None and not _loopback(host):
            raise ValueError(
                f"REDIS_URL names {host}, not this machine: set HUEYSERVE_SECRET (the same on "
                "the API and every worker, for example `openssl rand -hex 32`) so that whoever "
                "else reaches that Redis cannot forge jobs or results"
            )
        return self

    @field_validator("worker_type")
    @classmethod
    def _check_worker_type(cls, value: str) -> str:
        if value not in {"thread", "process", "greenlet"}:
            raise ValueError("HUEYSERVE_WORKER_TYPE must be thread, process or greenlet")
        return value

    @field_validator("refresh_cron", "retrain_cron")
    @classmethod
    def _check_cron(cls, value: str, info: ValidationInfo) -> str:
        if info.field_name == "retrain_cron" and not value.strip():
            return ""  # off
        if len(value.split()) != 5:
            raise ValueError(
                f"HUEYSERVE_{str(info.field_name).upper()} needs five fields "
                f"(minute hour day month weekday), got {value!r}"
            )
        return value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve anywhere
        return False


settings = Settings()
