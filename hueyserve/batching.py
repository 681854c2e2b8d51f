"""Dynamic batching in a worker process: concurrent predict tasks for the same model version
run as one `predict(batch)` call.

Each Huey worker thread that runs a predict task hands its rows to the model version's
Batcher and waits. The Batcher's thread takes what is waiting (up to a row limit, after at
most `max_wait_s` for more), predicts once, and hands each task its own rows' outputs. While
the model computes, new tasks queue up, so batches grow with load and cost no latency when
idle (Triton's default behaviour with a zero queue delay). If a batch fails, its tasks are
retried one by one, so one bad input fails only its own task.

With `adaptive`, the row limit follows Clipper's AIMD: it grows by `step` after a batch that
met the latency target and halves after one that missed it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from hueyserve.registry import LoadedModel, Outputs

logger = logging.getLogger(__name__)

IDLE_EXIT_S = 60.0  # a batcher thread with nothing to do this long ends (old versions)


@dataclass(frozen=True)
class BatchPolicy:
    max_rows: int = 64  #: most rows in one predict call; 1 turns batching off
    max_wait_s: float = 0.0  #: how long a batch may wait for more tasks
    adaptive: bool = False  #: AIMD on the row limit, toward `target_s`
    target_s: float = 0.05  #: latency target of one predict call (adaptive)
    step: int = 4  #: additive increase of the row limit


@dataclass
class _Slot:
    features: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    outputs: Outputs | None = None
    error: BaseException | None = None


#: Called after every predict call: (model, version, rows, tasks, seconds).
BatchObserver = Callable[[str, str, int, int, float], None]


class Batcher:
    """One model version's batching thread and its row limit."""

    def __init__(
        self,
        key: tuple[str, str],
        load: Callable[[str, str], LoadedModel],
        policy: BatchPolicy,
        observe: BatchObserver | None,
    ) -> None:
        self.key = key
        self.load = load
        self.policy = policy
        self.observe = observe
        self.limit = policy.step if policy.adaptive else policy.max_rows
        self.waiting: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self.held: _Slot | None = None  # taken from the queue, but it did not fit the batch

    def adapt(self, seconds: float) -> None:
        """AIMD: grow the row limit while batches meet the target, halve it when one misses."""
        if not self.policy.adaptive:
            return
        if seconds <= self.policy.target_s:
            self.limit = min(self.limit + self.policy.step, self.policy.max_rows)
        else:
            self.limit = max(self.limit // 2, 1)

    def next_batch(self, first: _Slot) -> list[_Slot]:
        batch, rows = [first], len(first.features)
        deadline = time.monotonic() + self.policy.max_wait_s
        while rows < self.limit:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    slot = self.waiting.get(timeout=remaining)
                else:
                    slot = self.waiting.get_nowait()
            except queue.Empty:
                break
            if rows + len(slot.features) > self.limit:
                self.held = slot  # first in the next batch
                break
            batch.append(slot)
            rows += len(slot.features)
        return batch

    def run_batch(self, batch: list[_Slot]) -> None:
        started = time.perf_counter()
        try:
            model = self.load(*self.key)
            if len(batch) == 1:
                batch[0].outputs = model.predict(batch[0].features)
            else:
                outputs = model.predict(np.concatenate([slot.features for slot in batch]))
                _split(outputs, batch)
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
            else:  # find the culprit: each task alone
                for slot in batch:
                    self.run_batch([slot])
                return
        seconds = time.perf_counter() - started
        self.adapt(seconds)
        if self.observe is not None:
            rows = sum(len(slot.features) for slot in batch)
            self.observe(*self.key, rows, len(batch), seconds)
        for slot in batch:
            slot.done.set()


def _split(outputs: Outputs, batch: list[_Slot]) -> None:
    """Each slot's rows of every output column."""
    start = 0
    for slot in batch:
        end = start + len(slot.features)
        slot.outputs = {name: column[start:end] for name, column in outputs.items()}
        start = end


class Batchers:
    """The batchers of one worker process, one per model version, started on first use."""

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
        slot = _Slot(features)
        with self._lock:  # the put happens under the lock an idle batcher exits under
            batcher = self._batchers.get((model, version))
            if batcher is None:
                batcher = self._start((model, version))
            batcher.waiting.put(slot)
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        assert slot.outputs is not None
        return slot.outputs

    def limits(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return {key: batcher.limit for key, batcher in self._batchers.items()}

    def _start(self, key: tuple[str, str]) -> Batcher:
        batcher = Batcher(key, self.load, self.policy, self.observe)
        self._batchers[key] = batcher
        name = f"batcher-{key[0]}-{key[1]}"
        threading.Thread(target=self._serve, args=(batcher,), name=name, daemon=True).start()
        return batcher

    def _serve(self, batcher: Batcher) -> None:
        while True:
            try:
                first, batcher.held = batcher.held or batcher.waiting.get(timeout=IDLE_EXIT_S), None
            except queue.Empty:
                with self._lock:
                    if batcher.waiting.empty():
                        del self._batchers[batcher.key]
                        return
                continue
            batch = batcher.next_batch(first)
            try:
                batcher.run_batch(batch)
            except Exception as exc:  # our own fault; still, never leave a task waiting
                logger.exception("batcher %s failed", batcher.key)
                for slot in batch:
                    if not slot.done.is_set():
                        slot.error = exc
                        slot.done.set()
