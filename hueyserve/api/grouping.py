"""Grouping: sync predict misses that arrive together travel to the workers as one task.

Words used throughout: requests are *coalesced* when identical ones share one job
(hueyserve.api.inference); misses are *grouped* here, one task for several jobs; a worker
*batches* the rows of concurrent tasks into one model call (hueyserve.worker.batching).

Each miss joins the open group of its model version and priority. A group is sent, as one Huey
task naming every request's job id and row count, at the end of the event-loop turn in which
it opened, unless `max_in_flight` groups of its key are still waiting for their answers: then
it keeps growing until one of them is answered, until it is full, or for MAX_HOLD_S at most
(a lost or slow task must not hold a model's requests back). Under load, groups therefore grow
to fit the time the workers take; a lone request is sent at once.

The worker answers each job on its own (record, result, wake-up), so a grouped request looks to
its client exactly like one sent alone, while the queue, Redis and the worker pay once per
group.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

GroupKey = tuple[str, str, int]  #: model, version, priority: what one task may mix
MAX_HOLD_S = 0.1  #: longest a group waits for groups in flight to be answered


@dataclass(eq=False)
class Group:
    key: GroupKey
    members: list[Member] = field(default_factory=list)
    rows: int = 0
    sent: bool = False
    unanswered: int = 0  #: members still waiting for their result, once sent


@dataclass(eq=False)
class Member:
    job_id: str
    features: np.ndarray
    group: Group
    enqueued: asyncio.Future[None]  #: resolves once the group is on the queue, or fails


#: Enqueues one group as one task (members in order).
SendGroup = Callable[[GroupKey, list[Member]], Awaitable[None]]


class Grouper:
    """One per API process. Call `add` for each miss, await its `enqueued`, wait for its
    result, then call `answered`, whatever happened."""

    def __init__(self, send: SendGroup, *, max_rows: int, max_in_flight: int) -> None:
        self._send = send
        self.max_rows = max_rows
        self.max_in_flight = max_in_flight  #: 0: no limit, every turn sends
        self._open: dict[GroupKey, Group] = {}
        self._in_flight: Counter[GroupKey] = Counter()
        self._sending: set[asyncio.Task[None]] = set()  # referenced until done

    def add(self, key: GroupKey, job_id: str, features: np.ndarray) -> Member:
        loop = asyncio.get_running_loop()
        group = self._open.get(key)
        if group is not None and group.rows + len(features) > self.max_rows:
            self._dispatch(group)  # full: worth a task of its own, in flight or not
            group = None
        if group is None:
            group = self._open[key] = Group(key)
            if not self.max_in_flight or self._in_flight[key] < self.max_in_flight:
                loop.call_soon(self._dispatch, group)  # after every request of this turn
            else:
                loop.call_later(MAX_HOLD_S, self._dispatch, group)
        member = Member(job_id, features, group, loop.create_future())
        group.members.append(member)
        group.rows += len(features)
        return member

    def answered(self, member: Member) -> None:
        """The member's wait is over; once a group's are all over, its key may send again."""
        group = member.group
        if not group.sent:  # given up before it was sent (cancelled): leave the group
            group.members.remove(member)
            group.rows -= len(member.features)
            return
        group.unanswered -= 1
        if group.unanswered == 0:
            self._in_flight[group.key] -= 1
            waiting = self._open.get(group.key)
            if waiting is not None:
                self._dispatch(waiting)

    def _dispatch(self, group: Group) -> None:
        if group.sent:
            return
        if self._open.get(group.key) is group:
            del self._open[group.key]  # a later request opens a group of its own
        if not group.members:
            return  # all its requests gave up before it was sent
        group.sent, group.unanswered = True, len(group.members)
        self._in_flight[group.key] += 1
        task = asyncio.ensure_future(self._deliver(group))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, group: Group) -> None:
        outcome: BaseException | None = None
        try:
            await self._send(group.key, group.members)
        except BaseException as exc:  # CancelledError too: no member may wait forever
            outcome = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            for member in group.members:
                if member.enqueued.done():
                    continue  # its request was cancelled meanwhile
                if outcome is None:
                    member.enqueued.set_result(None)
                elif isinstance(outcome, Exception):
                    member.enqueued.set_exception(outcome)
                else:
                    member.enqueued.cancel()
