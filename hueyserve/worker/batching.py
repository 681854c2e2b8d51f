"""Dynamic batching in a worker process: concurrent predict tasks for the same model version
run as one `predict(batch)` call.

Each Huey worker thread that runs a predict task hands its rows to the model version's
Batcher. One of the waiting threads leads: it takes what is waiting (up to a row limit, after
at most `max_wait_s` for more), predicts once, and hands each task its own rows' outputs.
While the model computes, new tasks queue up, so batches grow with load and cost no latency
when idle (Triton's default behaviour with a zero queue delay).

A task brings one part per job it answers (a group of sync requests brings several). If a
call fails, `predict_parts` splits the parts in halves until the bad one is alone: that one
job fails, the others get their answers, in a few calls even in a batch of a thousand. This
is the only place that isolates a bad input.

With `adaptive`, the row limit follows Clipper's AIMD: it grows by `step` after a batch that
met the latency target and halves after one that missed it.

The module is over 300 lines on purpose: the leader hand-off, the row limit and the isolation
of a bad part work on the same waiting slots and are read together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np

from hueyserve.models import Outputs
from hueyserve.worker.registry import LoadedModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int = 1024  #: most rows in one predict call; 1 turns batching off
    max_wait_s: float = 0.0  #: how long a batch may wait for more tasks
    adaptive: bool = False  #: AIMD on the row limit, toward `target_s`
    target_s: float = 0.05  #: latency target of one predict call (adaptive)
    step: int = 4  #: additive increase of the row limit


#: One part's answer: its outputs, or the error of its own rows.
Answer = Outputs | Exception


@dataclass
class _Slot:
    """One task waiting in a batcher, with one part per job it answers."""

    parts: list[np.ndarray]
    rows: int
    wake: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  #: woken to lead the next batch, not with answers
    answers: list[Answer] | None = None
    error: BaseException | None = None  #: our own fault: no answer at all

    def finish(self, answers: list[Answer] | None, error: BaseException | None) -> None:
        self.answers, self.error = answers, error
        self.wake.set()


#: Told of each call that succeeded: (parts, rows, seconds).
CallObserver = Callable[[int, int, float], None]


def answer_parts(
    model: LoadedModel, parts: list[np.ndarray], on_call: CallObserver | None = None
) -> list[Answer]:
    """Each part's answer: its own preprocess, then one batched predict for all of them
    (`predict_parts`), then its own postprocess. A part that fails in either of its own steps
    fails alone, before or after the others' shared call."""
    answers: list[Answer | None] = [None] * len(parts)
    prepared: list[tuple[int, np.ndarray]] = []
    for index, part in enumerate(parts):
        try:
            prepared.append((index, model.prepare(part)))
        except Exception as exc:
            answers[index] = exc
    computed = predict_parts(model.predict, [rows for _, rows in prepared], on_call)
    for (index, _), answer in zip(prepared, computed, strict=True):
        if not isinstance(answer, Exception):
            try:
                answer = model.finish(answer)
            except Exception as exc:
                answer = exc
        answers[index] = answer
    return cast(list[Answer], answers)


def predict_parts(
    predict: Callable[[np.ndarray], Any],
    parts: list[np.ndarray],
    on_call: CallObserver | None = None,
) -> list[Any]:
    """Each part's outputs from one call on all of them; if it fails, each half again, until
    a bad part is alone and gets its own error."""
    if not parts:
        return []
    try:
        features = parts[0] if len(parts) == 1 else np.concatenate(parts)
        started = time.perf_counter()
        outputs = predict(features)
        seconds = time.perf_counter() - started
    except Exception as exc:
        if len(parts) == 1:
            return [exc]
        half = len(parts) // 2
        return [
            *predict_parts(predict, parts[:half], on_call),
            *predict_parts(predict, parts[half:], on_call),
        ]
    if on_call is not None:
        on_call(len(parts), len(features), seconds)
    return [outputs] if len(parts) == 1 else list(split_rows(outputs, [len(p) for p in parts]))


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

    def predict_each(self, parts: list[np.ndarray]) -> list[Answer]:
        """Each part's answer, computed in one batch with concurrent tasks' parts."""
        slot = _Slot(parts, sum(len(part) for part in parts))
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
        assert slot.answers is not None
        return slot.answers

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
                if slot.answers is None and slot.error is None:
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
            rows = batch[0].rows
            while self._pending and rows + self._pending[0].rows <= self.limit:
                batch.append(self._pending.popleft())
                rows += batch[-1].rows
            return batch

    def _rows_waiting(self) -> int:
        return sum(slot.rows for slot in self._pending)

    def _run(self, batch: list[_Slot]) -> None:
        try:
            model = self.load(*self.key)
        except Exception as exc:  # no part can be answered: each gets the load's error
            for slot in batch:
                slot.finish([exc] * len(slot.parts), None)
            return
        parts = [part for slot in batch for part in slot.parts]
        calls: list[tuple[int, int, float]] = []
        answers = answer_parts(model, parts, lambda *call: calls.append(call))
        start = 0
        for slot in batch:  # first: nothing below may cost a task its answers
            slot.finish(answers[start : start + len(slot.parts)], None)
            start += len(slot.parts)
        for n_parts, rows, seconds in calls:  # calls that failed tell nothing of the limit
            self.adapt(seconds)
            # A call on the whole batch served every task; one on a half, each part alone.
            self._observe(rows, len(batch) if n_parts == len(parts) else n_parts, seconds)

    def _observe(self, rows: int, tasks: int, seconds: float) -> None:
        if self.observe is not None:
            try:
                self.observe(*self.key, rows, tasks, seconds)
            except Exception:
                logger.exception("batch observer failed")


def split_rows(outputs: Mapping[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
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

    def predict_each(self, model: str, version: str, parts: list[np.ndarray]) -> list[Answer]:
        """Each part's outputs (or its own error), computed in a batch with concurrent tasks.
        A model that does not load fails every part."""
        if not parts:
            return []  # all answered from the cache
        if self.policy.max_rows > 1:
            return self.get(model, version).predict_each(parts)
        try:
            loaded = self.load(model, version)
        except Exception as exc:
            return [exc] * len(parts)
        return answer_parts(loaded, parts)

    def predict(self, model: str, version: str, features: np.ndarray) -> Outputs:
        """The outputs for `features` as one part; its error is raised."""
        (answer,) = self.predict_each(model, version, [features])
        if isinstance(answer, Exception):
            raise answer
        return answer

    def get(self, model: str, version: str) -> Batcher:
        with self._lock:
            batcher = self._batchers.get((model, version))
            if batcher is None:
                batcher = Batcher((model, version), self.load, self.policy, self.observe)
                self._batchers[(model, version)] = batcher
            return batcher
