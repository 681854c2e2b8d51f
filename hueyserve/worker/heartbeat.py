"""Worker heartbeats: each consumer process reports in every few seconds; readiness reads them."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis

from hueyserve.wire import HEARTBEATS_KEY, heartbeat_member
from hueyserve.worker.outage import RedisOutage, unavailable

logger = logging.getLogger(__name__)


def worker_id() -> str:
    """This worker process, as job records and heartbeats name it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def beat(conn: redis.Redis, *, ttl_s: float, proof: str) -> None:
    """Record this process as alive, with the proof of its secret (so the API can tell that
    it shares it), and drop workers silent for longer than `ttl_s`."""
    now = time.time()
    with conn.pipeline() as pipe:
        pipe.zadd(HEARTBEATS_KEY, {heartbeat_member(worker_id(), proof): now})
        pipe.zremrangebyscore(HEARTBEATS_KEY, "-inf", now - ttl_s)
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
        on_beat: Callable[[], object] | None = None,
        outage: RedisOutage | None = None,
    ) -> None:
        self.conn = conn
        self.outage = outage or RedisOutage()
        self.proof = proof  #: wire.secret_proof of this worker's secret
        self.on_beat = on_beat
        self.interval_s = interval_s
        self.ttl_s = ttl_s
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
        try:
            self.conn.zrem(HEARTBEATS_KEY, heartbeat_member(worker_id(), self.proof))
        except redis.RedisError:
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                beat(self.conn, ttl_s=self.ttl_s, proof=self.proof)
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
