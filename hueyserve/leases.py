"""At least once: a task taken off the queue stays leased until its worker is done with it.

Huey pops a task off Redis destructively and keeps no record of it while it runs, so a worker
killed mid-task (kill -9, out of memory) would lose it. This storage leases every task it
hands to a worker: right after the pop, the task's queue entry goes into a sorted set scored
by the lease's expiry. The worker's heartbeat renews the leases of its running tasks; a worker
thread gives its lease back when it asks for its next task (or stops), whatever happened to
the last one (done, failed, retried, revoked, expired). Expired leases belong to dead workers:
`claim_expired` hands them to a reaper (core.reap_lost_tasks), which queues them again.

The one gap left is the round trip between the pop and the lease: a worker killed in those
microseconds loses that task.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import redis
from huey.storage import PriorityRedisExpireStorage

LEASES_KEY = "hueyserve:leases"  #: zset: a task's queue entry -> lease expiry (unix seconds)
PREFIX_BYTES = 8  #: huey's queue entries are an 8-byte timestamp, then the task message


class LeasingStorage(PriorityRedisExpireStorage):  # type: ignore[misc]
    """Huey's priority Redis storage, whose dequeue leases what it hands out."""

    lease_s = 10.0  #: set from HUEYSERVE_LEASE_S by core.py

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._held: dict[int, bytes] = {}  # worker thread -> the entry it holds
        self._entries: dict[str, bytes] = {}  # running task id -> its entry

    def dequeue(self) -> bytes | None:
        """Give back this thread's last lease, pop the most urgent task (one round trip for
        both), then lease it."""
        previous = self._give_back()
        with self.conn.pipeline(transaction=False) as pipe:
            if previous is not None:
                pipe.zrem(LEASES_KEY, previous)
            pipe.bzpopmin(self.queue_key, timeout=self.read_timeout)
            popped = pipe.execute()[-1]
        if not popped:
            return None  # empty; a ConnectionError propagates for Huey's backoff
        _, entry, _ = popped
        self.conn.zadd(LEASES_KEY, {entry: time.time() + self.lease_s})
        with self._lock:
            self._held[threading.get_ident()] = entry
        data: bytes = entry[PREFIX_BYTES:]
        return data

    def bind(self, task_id: str) -> None:
        """This thread's entry belongs to `task_id` (called as the task starts)."""
        with self._lock:
            entry = self._held.get(threading.get_ident())
            if entry is not None:
                self._entries[task_id] = entry

    def release(self) -> None:
        """Give back this thread's lease: its task is over, one way or another."""
        entry = self._give_back()
        if entry is not None:
            self.conn.zrem(LEASES_KEY, entry)

    def _give_back(self) -> bytes | None:
        with self._lock:
            entry = self._held.pop(threading.get_ident(), None)
            for task_id in [t for t, e in self._entries.items() if e is entry]:
                del self._entries[task_id]
        return entry

    def requeue(self, task_id: str, priority: int) -> bool:
        """Put a running task back on the queue now (its worker is stopping); False if this
        process holds no lease for it."""
        with self._lock:
            entry = self._entries.pop(task_id, None)
            for thread, held in list(self._held.items()):
                if held is entry:
                    del self._held[thread]
        if entry is None:
            return False
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.zrem(LEASES_KEY, entry)
            pipe.zadd(self.queue_key, {entry: -priority})
            pipe.execute()
        return True

    def renew(self) -> None:
        """Extend the leases of every task this process is running (each heartbeat)."""
        with self._lock:
            entries = list(self._held.values())
        if entries:
            until = time.time() + self.lease_s
            self.conn.zadd(LEASES_KEY, dict.fromkeys(entries, until), xx=True)

    def claim_expired(self, limit: int = 100) -> Iterator[bytes]:
        """Entries whose lease expired, each claimed by exactly one caller (ZREM decides)."""
        expired = self.conn.zrangebyscore(LEASES_KEY, "-inf", time.time(), start=0, num=limit)
        for entry in expired:
            if self.conn.zrem(LEASES_KEY, entry):
                yield entry

    def enqueue_entry(self, entry: bytes, priority: int) -> None:
        """Back on the queue, in its old place among tasks of its priority."""
        self.conn.zadd(self.queue_key, {entry: -priority})


def lease_count(conn: redis.Redis) -> int:
    return int(conn.zcard(LEASES_KEY))
