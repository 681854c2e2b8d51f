"""At least once: a task taken off the queue stays leased until its worker is done with it.

Huey pops a task off Redis destructively and keeps no record of it while it runs, so a worker
killed mid-task (kill -9, out of memory) would lose it. This storage takes a task and leases
it in one Lua script: the task's queue entry moves atomically from the queue into a sorted set
scored by the lease's expiry. The worker's heartbeat renews the leases of its running tasks; a
worker thread gives its lease back when it asks for its next task (or stops), whatever
happened to the last one (done, failed, retried, revoked, expired). Expired leases belong to
dead workers: `claim_expired` hands them to a reaper (core.reap_lost_tasks), which queues
them again.

A script cannot block, so an idle worker waits on a doorbell list instead (BLPOP): every
enqueue, here and in the API's enqueue script, also pushes a token to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import redis
from huey.storage import PriorityRedisExpireStorage

PREFIX_BYTES = 8  #: huey's queue entries are an 8-byte timestamp, then the task message
DOORBELL_TOKENS = 1024  #: most tokens kept: idle workers wake at most this often for nothing


def leases_key(queue_key: str) -> str:
    """Sorted set: a running task's queue entry -> its lease's expiry (unix seconds)."""
    return f"{queue_key}:leases"


def doorbell_key(queue_key: str) -> str:
    """List of tokens, one pushed per enqueue, on which idle workers block."""
    return f"{queue_key}:doorbell"


#: KEYS: the queue, the leases. ARGV: the lease's expiry, the entry whose lease this worker
#: gives back ('' for none). The most urgent entry, now leased, or nil.
TAKE_SCRIPT = """
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[2]) end
local popped = redis.call('ZPOPMIN', KEYS[1])
if #popped == 0 then return false end
redis.call('ZADD', KEYS[2], ARGV[1], popped[1])
return popped[1]
"""


class LeasingStorage(PriorityRedisExpireStorage):  # type: ignore[misc]
    """Huey's priority Redis storage, whose dequeue leases what it hands out."""

    lease_s = 10.0  #: set from HUEYSERVE_LEASE_S by core.py

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.leases_key = leases_key(self.queue_key)
        self.doorbell_key = doorbell_key(self.queue_key)
        self._take = self.conn.register_script(TAKE_SCRIPT)
        self._lock = threading.Lock()
        self._held: dict[int, bytes] = {}  # worker thread -> the entry it holds
        self._entries: dict[str, bytes] = {}  # running task id -> its entry

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """Huey's enqueue (scheduled tasks, retries, periodic tasks), ringing the doorbell."""
        prefix = time.time_ns() // 1000
        self.enqueue_entry(prefix.to_bytes(PREFIX_BYTES, "big") + data, priority or 0)

    def enqueue_entry(self, entry: bytes, priority: int) -> None:
        """An entry (back) on the queue, in its place among tasks of its priority."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.zadd(self.queue_key, {entry: -priority})
            self._ring(pipe)
            pipe.execute()

    def _ring(self, pipe: redis.client.Pipeline) -> None:
        pipe.lpush(self.doorbell_key, 1)
        pipe.ltrim(self.doorbell_key, 0, DOORBELL_TOKENS - 1)

    def dequeue(self) -> bytes | None:
        """Give back this thread's last lease and take the most urgent task with a lease of
        its own, in one atomic script; when there is none, wait for the doorbell and try once
        more."""
        previous = self._give_back()
        entry = self._take_one(previous)
        if entry is None:
            self.conn.blpop([self.doorbell_key], timeout=self.read_timeout)
            entry = self._take_one()
        if entry is None:
            return None  # nothing yet; a ConnectionError propagates for Huey's backoff
        with self._lock:
            self._held[threading.get_ident()] = entry
        return entry[PREFIX_BYTES:]

    def _take_one(self, give_back: bytes | None = None) -> bytes | None:
        keys = [self.queue_key, self.leases_key]
        entry = self._take(keys=keys, args=[self._until(), give_back or b""])
        return None if entry is None else bytes(entry)

    def _until(self) -> float:
        return time.time() + self.lease_s

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
            self.conn.zrem(self.leases_key, entry)

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
            pipe.zrem(self.leases_key, entry)
            pipe.zadd(self.queue_key, {entry: -priority})
            self._ring(pipe)
            pipe.execute()
        return True

    def renew(self) -> None:
        """Extend the leases of every task this process is running (each heartbeat)."""
        with self._lock:
            entries = list(self._held.values())
        if entries:
            self.conn.zadd(self.leases_key, dict.fromkeys(entries, self._until()), xx=True)

    def claim_expired(self, limit: int = 100) -> Iterator[bytes]:
        """Entries whose lease expired, each claimed by exactly one caller (ZREM decides)."""
        expired = self.conn.zrangebyscore(self.leases_key, "-inf", time.time(), start=0, num=limit)
        for entry in expired:
            if self.conn.zrem(self.leases_key, entry):
                yield entry

    def lease_count(self) -> int:
        return int(self.conn.zcard(self.leases_key))
