"""Dynamic batching in a worker process: concurrent predict tasks for the same model version
run as one `predict(batch)` call.

Each Huey worker thread that runs a predict task hands its rows to the model version's
Batcher. One of the waiting threads leads: it takes what is waiting (up to a row limit, after
at most `max_wait_s` for more), predicts once, and hands each task its own rows' outputs.
While the model computes, new tasks queue up, so batches grow with load and cost no latency
when idle (Triton's default behaviour with a zero queue delay). If a batch fails, its tasks
are retried one by one, so one bad input fails only its own task.

With `adaptive`, the row limit follows Clipper's AIMD: it grows by `step` after a batch that
met the latency target and halves after one that missed it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hueyserve.registry import LoadedModel, Outputs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int = 1024  #: most rows in one predict call; 1 turns batching off
    max_wait_s: float = 0.0  #: how long a batch may wait for more tasks
    adaptive: bool = False  #: AIMD on the row limit, toward `target_s`
    target_s: float = 0.05  #: latency target of one predict call (adaptive)
    step: int = 4  #: additive increase of the row limit


@dataclass
class _Slot:
    features: np.ndarray
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  #: woken to lead the next batch, not with a result
    outputs: Outputs | None = None
    error: BaseException | None = None

    def finish(self, outputs: Outputs | None, error: BaseException | None) -> None:
        self.outputs, self.error = outputs, error
        self.wake.set()


#: Called after every predict call: (model, version, rows, tasks, seconds).
BatchObserver = Callable[[str, str, int, int, float], None]


class Batcher:
    """One model version's waiting tasks and row limit. No thread of its own: the first
    waiting task's thread leads (runs the batch), then hands the lead to the next waiting
    task, so an idle worker pays no hand-off at all."""

    def __init__(
        self,
        key: tuple[str, str],
        load: Callable[[str, str], LoadedModel],
        policy: BatchPolicy,
        observe: BatchObserver | None = None,
    ) -> None:
        self.key = key
        self.load = load
        self.policy = policy
        self.observe = observe
        self.limit = policy.step if policy.adaptive else policy.max_rows
        self._pending: deque[_Slot] = deque()
        self._leading = False
        self._cond = threading.Condition()

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._pending)

    @property
    def rows_waiting(self) -> int:
        with self._cond:
            return self._rows_waiting()

    def predict(self, features: np.ndarray) -> Outputs:
        slot = _Slot(features)
        with self._cond:
            self._pending.append(slot)
            lead = not self._leading
            self._leading = True
            self._cond.notify_all()  # a leader may be waiting for more rows
        if not lead:
            try:
                slot.wake.wait()
            except BaseException:  # a greenlet worker's task timeout: leave no orphan behind
                with self._cond:
                    if slot in self._pending:
                        self._pending.remove(slot)
                        if slot.lead:
                            self._pass_lead()
                raise
        if lead or slot.lead:
            self._lead()
        if slot.error is not None:
            raise slot.error
        assert slot.outputs is not None
        return slot.outputs

    def adapt(self, seconds: float) -> None:
        """AIMD: grow the row limit while batches meet the target, halve it when one misses."""
        if not self.policy.adaptive:
            return
        if seconds <= self.policy.target_s:
            self.limit = min(self.limit + self.policy.step, self.policy.max_rows)
        else:
            self.limit = max(self.limit // 2, 1)

    def _lead(self) -> None:
        """Run one batch (this thread's task first), then pass the lead on or give it up."""
        batch = self._take()
        try:
            self._run(batch)
        except Exception as exc:  # our own fault; still, never leave a task waiting
            logger.exception("batch of %s failed", self.key)
            for slot in batch:
                if slot.outputs is None and slot.error is None:
                    slot.finish(None, exc)
        with self._cond:
            self._pass_lead()

    def _pass_lead(self) -> None:
        """Wake the next waiting task to lead, or give the lead up (hold the lock)."""
        if self._pending:
            successor = self._pending[0]
            successor.lead = True
            successor.wake.set()
        else:
            self._leading = False

    def _take(self) -> list[_Slot]:
        """The waiting tasks that fit the row limit, after up to max_wait for more."""
        deadline = time.monotonic() + self.policy.max_wait_s
        with self._cond:
            while self._rows_waiting() < self.limit:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            batch = [self._pending.popleft()]  # this thread's own task, whatever its size
            rows = len(batch[0].features)
            while self._pending and rows + len(self._pending[0].features) <= self.limit:
                batch.append(self._pending.popleft())
                rows += len(batch[-1].features)
            return batch

    def _rows_waiting(self) -> int:
        return sum(len(slot.features) for slot in self._pending)

    def _run(self, batch: list[_Slot]) -> None:
        started = time.perf_counter()
        try:
            model = self.load(*self.key)
            if len(batch) == 1:
                outputs = [model.predict(batch[0].features)]
            else:
                merged = model.predict(np.concatenate([s.features for s in batch]))
                outputs = split_rows(merged, [len(s.features) for s in batch])
        except Exception as exc:
            if len(batch) == 1:
                batch[0].finish(None, exc)
            else:  # find the culprit: each task alone
                for slot in batch:
                    self._run([slot])
            return
        seconds = time.perf_counter() - started
        for slot, answer in zip(batch, outputs, strict=True):
            slot.finish(answer, None)  # first: nothing below may cost a task its answer
        self.adapt(seconds)
        if self.observe is not None:
            try:
                self.observe(*self.key, sum(len(s.features) for s in batch), len(batch), seconds)
            except Exception:
                logger.exception("batch observer failed")


def split_rows(outputs: Outputs, sizes: list[int]) -> list[Outputs]:
    """Outputs of stacked inputs, cut back into one part per input of the given row counts."""
    parts, start = [], 0
    for size in sizes:
        parts.append({name: column[start : start + size] for name, column in outputs.items()})
        start += size
    return parts


class Batchers:
    """The batchers of one worker process, one per model version."""

    def __init__(
        self,
        load: Callable[[str, str], LoadedModel],
        policy: BatchPolicy,
        observe: BatchObserver | None = None,
    ) -> None:
        self.load = load
        self.policy = policy
        self.observe = observe
        self._batchers: dict[tuple[str, str], Batcher] = {}
        self._lock = threading.Lock()

    def predict(self, model: str, version: str, features: np.ndarray) -> Outputs:
        """The outputs for `features`, computed in a batch with concurrent callers."""
        if self.policy.max_rows <= 1:
            return self.load(model, version).predict(features)
        return self.get(model, version).predict(features)

    def get(self, model: str, version: str) -> Batcher:
        with self._lock:
            batcher = self._batchers.get((model, version))
            if batcher is None:
                batcher = Batcher((model, version), self.load, self.policy, self.observe)
                self._batchers[(model, version)] = batcher
            return batcher
