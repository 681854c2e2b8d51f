"""A consumer's view of Redis being unavailable (unreachable, or refusing writes at maxmemory):
one line when it goes, one when it is back.

Every worker thread, the heartbeat, the lease renewer and the scheduler each fail on every
attempt while Redis is down; logged each time with a traceback, a 15-second outage printed
over ten thousand lines. They report here instead, and only a change of state is logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import redis

logger = logging.getLogger(__name__)

#: What an unreachable (or too slow) Redis raises.
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError)


def refuses_writes(exc: BaseException) -> bool:
    """A write refused at maxmemory under noeviction: redis-py's OutOfMemoryError, or inside
    a Lua script, where Redis 6 reports it as a script error."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.ResponseError) and "OOM command not allowed" in str(exc)


def unavailable(exc: BaseException) -> bool:
    """Redis is unreachable or refuses writes; anything else is a real error."""
    return isinstance(exc, UNREACHABLE) or refuses_writes(exc)


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
        self._last_refusal = -math.inf  #: when a write was last refused
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._down_since is not None

    @property
    def refusing_writes(self) -> bool:
        """A write was refused within `settle_s` (a timeout meanwhile does not end that)."""
        return time.monotonic() - self._last_refusal < self.settle_s

    def failed(self, exc: BaseException, doing: str) -> None:
        """`doing` failed for want of Redis; logged only if Redis was up until now."""
        refused = refuses_writes(exc)
        with self._lock:
            now = time.monotonic()
            if refused:
                self._last_refusal = now
            if self._down_since is not None:
                return
            self._down_since = now
        why = "refuses writes" if refused else "is unreachable"
        logger.error("Redis %s (%s: %s); waiting for it", why, doing, exc)

    def reached(self) -> None:
        """A write went through: Redis is back (once none was refused for `settle_s`)."""
        if self._down_since is None:  # the usual case, without taking the lock
            return
        with self._lock:
            if self._down_since is None or self.refusing_writes:
                return
            lasted_s, self._down_since = time.monotonic() - self._down_since, None
        logger.warning("Redis is available again after %.1f s", lasted_s)
