"""A consumer's view of Redis being unreachable: one line when it goes, one when it is back.

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

#: What an unreachable (or too slow) Redis raises; anything else is a real error.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


class RedisOutage:
    """Whether this process currently finds Redis unreachable (shared by its threads)."""

    def __init__(self) -> None:
        self._down_since: float | None = None
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    def failed(self, exc: BaseException, doing: str) -> None:
        """`doing` failed for want of Redis; logged only if Redis was up until now."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        logger.error("Redis is unreachable (%s: %s); waiting for it", doing, exc)

    def reached(self) -> None:
        """Redis answered; logged only at the end of an outage."""
        if self._down_since is None:  # the usual case, without taking the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            lasted_s, self._down_since = time.monotonic() - self._down_since, None
        logger.warning("Redis is reachable again after %.1f s", lasted_s)
