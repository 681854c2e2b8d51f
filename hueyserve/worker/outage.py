"""A consumer's view of Redis being unavailable (unreachable, or refusing writes at maxmemory):
one line when it goes, one when it is back.

Every worker thread, the heartbeat, the lease renewer and the scheduler each fail on every
attempt while Redis is down; logged each time with a traceback, a 15-second outage printed
over ten thousand lines. They report here instead, and only a change of state is logged.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

logger = logging.getLogger(__name__)

#: What an unreachable (or too slow) Redis raises, or a full one (maxmemory under noeviction)
#: refusing a write; anything else is a real error.
UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    ConnectionError,
    TimeoutError,
    redis.exceptions.OutOfMemoryError,
)


class RedisOutage:
    """Whether this process currently finds Redis unavailable (shared by its threads).

    Unreachable: the first write that goes through ends the outage. Refusing writes (under
    maxmemory some writes still pass, those that free as much as they take): successes and
    failures interleave, so Redis counts as back only after `settle_s` without a failure, and
    worker threads take no task meanwhile (each would fail to store its result, with a
    traceback, and run again later).
    """

    def __init__(self, settle_s: float = 2.0) -> None:
        self.settle_s = settle_s
        self._down_since: float | None = None
        self._last_failure = 0.0
        self._refusing = False  #: the last failure was a refused write
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def refusing_writes(self) -> bool:
        return self._down_since is not None and self._refusing

    def failed(self, exc: BaseException, doing: str) -> None:
        """`doing` failed for want of Redis; logged only if Redis was up until now."""
        refused = isinstance(exc, redis.exceptions.OutOfMemoryError)
        with self._lock:
            self._last_failure, self._refusing = time.monotonic(), refused
            if self._down_since is not None:
                return
            self._down_since = self._last_failure
        why = "refuses writes" if refused else "is unreachable"
        logger.error("Redis %s (%s: %s); waiting for it", why, doing, exc)

    def reached(self) -> None:
        """A write went through: Redis is back (once no write failed for `settle_s`, after
        refused writes)."""
        if self._down_since is None:  # the usual case, without taking the lock
            return
        with self._lock:
            now = time.monotonic()
            if self._down_since is None:
                return
            if self._refusing and now - self._last_failure < self.settle_s:
                return
            lasted_s, self._down_since = now - self._down_since, None
        logger.warning("Redis is available again after %.1f s", lasted_s)
