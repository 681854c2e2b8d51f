"""At least once: a task taken off the queue stays leased until its worker is done with it.

Huey pops a task off Redis destructively and keeps no record of it while it runs, so a worker
killed mid-task (kill -9, out of memory) would lose it. This storage takes a task and leases
it in one Lua script: the task's queue entry moves atomically from the queue into a sorted set
scored by the lease's expiry. The worker's heartbeat renews the leases of its running tasks; a
worker thread gives its lease back when it asks for its next task (or stops), once Huey has
recorded how the last one ended (done, failed, retried, revoked, expired: `finish`); if that
record failed (Redis went away), the lease is left to lapse instead. Expired leases belong to
dead workers: a reaper (hueyserve.worker.lifecycle) queues them again. Leases are renewed on a
thread of their own (`start_renewing`), so nothing slow elsewhere lets them lapse.

A script cannot block, so an idle worker waits on a doorbell list instead (BLPOP): every
enqueue, here and in the API's enqueue script, also pushes a token to it.
"""

from __future__ import annotations

import logging
import threading
import time

import redis
from huey.storage import PriorityRedisExpireStorage

from hueyserve.wire import (
    DOORBELL_TOKENS,
    PUT_BACK_SCRIPT,
    TAKE_SCRIPT,
    doorbell_key,
    leases_key,
    message_of,
    queue_entry,
    queue_score,
    tick_key,
)
from hueyserve.worker.outage import RedisOutage, unavailable

logger = logging.getLogger(__name__)

TICK_TTL_S = 3600  #: a minute's claim outlives any clock skew between consumers
OUTAGE_PAUSE_S = 1.0  #: how long a worker thread waits before trying an unreachable Redis again


class LeasingStorage(PriorityRedisExpireStorage):  # type: ignore[misc]
    """Huey's priority Redis storage, whose dequeue leases what it hands out for `lease_s`
    (Huey passes its extra keyword arguments to the storage)."""

    def __init__(self, *args: object, lease_s: float = 10.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.lease_s = lease_s
        self.leases_key = leases_key(self.queue_key)
        self.doorbell_key = doorbell_key(self.queue_key)
        self._take = self.conn.register_script(TAKE_SCRIPT)
        self._put_back = self.conn.register_script(PUT_BACK_SCRIPT)
        self._lock = threading.Lock()
        self._held: dict[int, bytes] = {}  # worker thread -> the entry it holds
        self._entries: dict[str, bytes] = {}  # running task id -> its entry
        self._finished: set[int] = set()  # threads whose task ended as Huey recorded
        self._requeueing: set[int] = set()  # threads whose task's retry is being queued
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        self.outage = RedisOutage()  #: shared by every thread of this consumer
        #: The consumer is stopping: its threads take no more tasks (core.Huey sets it).
        self.stopping = False

    def enqueue(self, data: bytes, priority: int | None = None) -> None:
        """Huey's enqueue (scheduled tasks, retries, periodic tasks), ringing the doorbell."""
        with self.conn.pipeline(transaction=True) as pipe:
            pipe.zadd(self.queue_key, {queue_entry(data): queue_score(priority)})
            self._ring(pipe)
            pipe.execute()
        self._requeued()

    def add_to_schedule(self, data: bytes, ts: object) -> None:
        """Huey's schedule (a retry with a delay), then the lease of the task retried may go."""
        super().add_to_schedule(data, ts)
        self._requeued()

    def _ring(self, pipe: redis.client.Pipeline) -> None:
        pipe.lpush(self.doorbell_key, 1)
        pipe.ltrim(self.doorbell_key, 0, DOORBELL_TOKENS - 1)

    def dequeue(self) -> bytes | None:
        """Give back this thread's last lease and take the most urgent task with a lease of
        its own, in one atomic script; when there is none, wait for the doorbell and try once
        more. While Redis is unreachable or refuses writes: nothing, after a pause, logged
        once per outage (Huey would log a traceback per thread and attempt)."""
        previous = self._give_back()
        if self.stopping:  # SIGTERM: the tasks it put back are for the other consumers
            if previous is not None:
                self.conn.zrem(self.leases_key, previous)
            time.sleep(OUTAGE_PAUSE_S)
            return None
        if self.outage.refusing_writes:  # wait rather than take a task Redis cannot record
            if previous is not None:
                self._keep(previous)
            time.sleep(OUTAGE_PAUSE_S)
            return None
        try:
            entry = self._take_one(previous)
            if entry is None:
                self.conn.blpop([self.doorbell_key], timeout=self.read_timeout)
                if self.stopping:  # the doorbell may be a task this consumer just put back
                    return None
                entry = self._take_one()
        except BaseException as exc:
            if previous is not None:  # still ours to give back later
                self._keep(previous)
            if not unavailable(exc):
                raise
            self.outage.failed(exc, "taking a task")
            time.sleep(OUTAGE_PAUSE_S)
            return None
        if entry is None:
            return None  # a read, which a Redis refusing writes still answers: proves nothing
        self.outage.reached()  # a task leased: Redis took a write
        with self._lock:
            self._held[threading.get_ident()] = entry
        return message_of(entry)

    def _keep(self, entry: bytes) -> None:
        """This thread's last lease could not be given back: try again at its next dequeue."""
        with self._lock:
            self._held[threading.get_ident()] = entry
            self._finished.add(threading.get_ident())

    def read_schedule(self, ts: object) -> list[bytes]:
        """Huey's scheduler reads each second; while Redis is unreachable, nothing is due."""
        try:
            due: list[bytes] = super().read_schedule(ts)
        except Exception as exc:
            if not unavailable(exc):
                raise
            self.outage.failed(exc, "reading the schedule")
            return []
        return due

    def claim_tick(self, task_name: str, minute: str) -> bool:
        """Whether this consumer enqueues periodic `task_name` for `minute`: every consumer's
        scheduler asks, the first wins (one scheduler is enough, as Huey advises, without an
        operator choosing which consumer runs it)."""
        try:
            claimed = self.conn.set(
                tick_key(self.queue_key, task_name, minute), 1, nx=True, ex=TICK_TTL_S
            )
        except Exception as exc:
            if not unavailable(exc):
                raise
            self.outage.failed(exc, "scheduling periodic tasks")
            return False
        return bool(claimed)

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

    def finish_once_requeued(self) -> None:
        """This thread's task failed and Huey queues its retry next: the lease may go once
        the retry is stored (`enqueue` or `add_to_schedule` succeeded). If that write fails,
        the lease lapses and a reaper queues the task again: it is never in neither place."""
        with self._lock:
            if threading.get_ident() in self._held:
                self._requeueing.add(threading.get_ident())

    def _requeued(self) -> None:
        with self._lock:
            thread = threading.get_ident()
            if thread in self._requeueing:
                self._requeueing.discard(thread)
                self._finished.add(thread)

    def finish(self) -> None:
        """This thread's task reached an end Huey has recorded (a result, a final error, a
        retry, a revoke, an expiry): its lease may go at the next take."""
        with self._lock:
            if threading.get_ident() in self._held:
                self._finished.add(threading.get_ident())

    def release(self) -> None:
        """Give back this thread's lease (it stops), if its task finished."""
        entry = self._give_back()
        if entry is not None:
            self.conn.zrem(self.leases_key, entry)

    def _give_back(self) -> bytes | None:
        """This thread's entry, to give back, if its task finished. Otherwise (Redis failed
        under Huey as it stored the end) it is forgotten here, not renewed: its lease lapses
        and a reaper queues the task again."""
        thread = threading.get_ident()
        with self._lock:
            entry = self._held.pop(thread, None)
            finished = thread in self._finished
            self._finished.discard(thread)
            self._requeueing.discard(thread)
            for task_id in [t for t, e in self._entries.items() if e is entry]:
                del self._entries[task_id]
        return entry if finished else None

    def take_back(self, task_id: str) -> bytes | None:
        """Forget a running task's lease here (its worker is stopping) and answer its entry,
        for `put_back`; None if this process holds no lease for it."""
        with self._lock:
            entry = self._entries.pop(task_id, None)
            for thread, held in list(self._held.items()):
                if held is entry:
                    del self._held[thread]
        return entry

    def put_back(self, entry: bytes, priority: int) -> bool:
        """End a lease and queue its entry again, in its old place, atomically (the task is
        always either leased or queued). False when the lease was gone: another reaper got
        there first."""
        keys = [self.leases_key, self.queue_key, self.doorbell_key]
        return bool(self._put_back(keys=keys, args=[entry, queue_score(priority), DOORBELL_TOKENS]))

    def start_renewing(self, interval_s: float) -> None:
        """Renew this process's leases every `interval_s` on a thread of their own, so that
        nothing slow elsewhere (a model load) lets a running task's lease expire."""
        with self._lock:
            if self._renewer is not None and self._renewer.is_alive():
                return
            self._stop_renewing.clear()
            self._renewer = threading.Thread(
                target=self._renew_until_stopped, args=(interval_s,), name="leases", daemon=True
            )
            self._renewer.start()

    def stop_renewing(self) -> None:
        self._stop_renewing.set()

    def _renew_until_stopped(self, interval_s: float) -> None:
        while not self._stop_renewing.wait(interval_s):
            try:
                self.renew()
            except redis.RedisError as exc:
                if unavailable(exc):
                    self.outage.failed(exc, "renewing leases")
                else:
                    logger.warning("renewing leases failed: %s", exc)

    def renew(self) -> None:
        """Extend the leases of every task this process is running (each heartbeat)."""
        with self._lock:
            entries = list(self._held.values())
        if entries:
            self.conn.zadd(self.leases_key, dict.fromkeys(entries, self._until()), xx=True)

    def expired(self, limit: int = 100) -> list[bytes]:
        """Entries whose lease expired: their worker died. Several reapers may see the same
        one; `put_back` is idempotent (the same entry is queued once)."""
        found: list[bytes] = self.conn.zrangebyscore(
            self.leases_key, "-inf", time.time(), start=0, num=limit
        )
        return found

    def holding(self) -> int:
        """Entries this process's worker threads hold (leased, or finished and not yet given
        back at their next take)."""
        with self._lock:
            return len(self._held)

    def lease_count(self) -> int:
        return int(self.conn.zcard(self.leases_key))
