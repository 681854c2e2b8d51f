"""Worker heartbeats: each consumer process reports in every few seconds; readiness reads them."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson
import redis

from hueyserve.wire import (
    BEAT_SCRIPT,
    EVENTS_KEY,
    HEARTBEATS_KEY,
    LEAVE_SCRIPT,
    heartbeat_member,
    worker_status_key,
)
from hueyserve.worker.outage import RedisOutage, unavailable

logger = logging.getLogger(__name__)


def worker_id() -> str:
    """This worker process, as job records and heartbeats name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(
    conn: redis.Redis,
    *,
    ttl_s: float,
    proof: str,
    events_max_len: int,
    status: dict[str, Any] | None = None,
) -> None:
    """Record this process as alive, with the proof of its secret (so the API can tell that
    it shares it), and drop workers silent for longer than `ttl_s` (as `lost` events); its
    `status` (running tasks, loaded models) lives as long as the beat."""
    now = time.time()
    member = heartbeat_member(worker_id(), proof)
    args: list[str | float] = [member, now, now - ttl_s, events_max_len]
    with conn.pipeline(transaction=False) as pipe:
        conn.register_script(BEAT_SCRIPT)(keys=[HEARTBEATS_KEY, EVENTS_KEY], args=args, client=pipe)
        if status is not None:
            pipe.set(worker_status_key(worker_id()), orjson.dumps(status), ex=math.ceil(ttl_s))
        pipe.execute()


class Heartbeat:
    """A daemon thread that beats until stopped; start() and stop() are idempotent.

    `on_beat` runs after each beat: a cheap place for checks that must happen every few
    seconds rather than every minute (such as republishing models after Redis lost them).
    """

    def __init__(
        self,
        conn: redis.Redis,
        *,
        interval_s: float,
        ttl_s: float,
        proof: str,
        events_max_len: int = 100_000,
        status: Callable[[], dict[str, Any]] | None = None,
        on_beat: Callable[[], object] | None = None,
        outage: RedisOutage | None = None,
    ) -> None:
        self.conn = conn
        self.outage = outage or RedisOutage()
        self.proof = proof  #: wire.secret_proof of this worker's secret
        self.on_beat = on_beat
        self.interval_s = interval_s
        self.ttl_s = ttl_s
        self.events_max_len = events_max_len
        self.status = status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=self.interval_s + 1)
            self._thread = None
        member = heartbeat_member(worker_id(), self.proof)
        try:
            leave = self.conn.register_script(LEAVE_SCRIPT)
            leave(
                keys=[HEARTBEATS_KEY, EVENTS_KEY], args=[member, time.time(), self.events_max_len]
            )
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(
                    self.conn,
                    ttl_s=self.ttl_s,
                    proof=self.proof,
                    events_max_len=self.events_max_len,
                    status=None if self.status is None else self.status(),
                )
                self.outage.reached()
                if self.on_beat is not None:
                    self.on_beat()
            except Exception as exc:
                if unavailable(exc):
                    self.outage.failed(exc, "heartbeat")
                elif isinstance(exc, redis.RedisError):
                    logger.warning("heartbeat failed: %s", exc)
                else:
                    logger.exception("heartbeat check failed")
            self._stop.wait(self.interval_s)
