"""Training in a child process: spawned (fork is unsafe in a threaded worker), at a lower CPU
priority, stopped after the time limit, and dead with its parent (Linux), so a long fit can
neither slow the predictions its worker serves nor outlive it."""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from hueyserve.training import TrainingError, TrainPlan
from hueyserve.worker.store import ModelStore

if TYPE_CHECKING:
    from hueyserve.worker.fitting import Owner
    from hueyserve.worker.progress import Progress

logger = logging.getLogger(__name__)


def train_in_child(
    store: ModelStore,
    plan: TrainPlan,
    data_dir: Path,
    *,
    niceness: int,
    timeout_s: float,
    owner: Owner | None = None,
    report: Progress | None = None,
) -> str:
    """`train_to_folder` in a fresh process at a lower CPU priority, stopped after `timeout_s`.
    Fitting and saving hold the GIL for long stretches; in a child they cannot slow the
    predictions this worker process serves, and the OS gives predictions the cores first.
    The child dies with this worker thread (a killed consumer leaves no fit running)."""
    from hueyserve.worker import fitting  # it imports this module: not at the top (a cycle)

    if multiprocessing.current_process().daemon:
        # `huey_consumer -k process`: a daemon may not start children, and this worker is a
        # process of its own anyway, so no other worker shares its GIL.
        return fitting.train_to_folder(store, plan, data_dir, owner, report)
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded process
    with context.Pool(1, initializer=_start_child, initargs=(niceness, os.getpid())) as child:
        args = (store, plan, data_dir, owner, report)
        pending = child.apply_async(fitting.train_to_folder, args)
        try:
            return str(pending.get(timeout_s))
        except multiprocessing.TimeoutError:
            raise TrainingError(
                f"training took longer than {timeout_s:g}s (HUEYSERVE_TRAIN_TIMEOUT_S) and was "
                "stopped; train a smaller model or raise the limit"
            ) from None


PR_SET_PDEATHSIG = 1  #: prctl(2): the signal this process gets when its parent thread ends


def _start_child(niceness: int, parent: int) -> None:
    """In the training child: a lower CPU priority, and death with its parent (Linux)."""
    os.nice(niceness)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl failed (errno %s): this training may outlive its worker",
                           ctypes.get_errno())  # fmt: skip
    except (OSError, AttributeError):  # not Linux: the time limit bounds it while the parent lives
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
