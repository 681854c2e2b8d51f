"""Fitting in a worker: train a planned version, describe it, save it; the demo models; one
training at a time across every worker.

Fitting runs in a spawned child process at a lower CPU priority (`train_in_child`), so a
long fit cannot slow the predictions its worker serves.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock
from sklearn.base import is_classifier
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split

from hueyserve import datasets
from hueyserve.models import label_datatype
from hueyserve.training import DEMOS, TrainingError, TrainPlan, build_estimator
from hueyserve.wire import TRAINING_LOCK_KEY
from hueyserve.worker.store import ModelStore

if TYPE_CHECKING:  # the training child imports this module and needs no settings
    from hueyserve.settings import Settings

logger = logging.getLogger(__name__)

BOOTSTRAPPED_FILE = ".demos"  #: in the store root: demo models already created once


def train(plan: TrainPlan, data_dir: Path) -> tuple[Any, dict[str, Any]]:
    """Fit the plan's estimator on its data set; returns it with the metadata to save."""
    try:
        data = datasets.load(plan.dataset, data_dir, plan.target)
    except datasets.DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    estimator = build_estimator(plan)
    classifier = is_classifier(estimator)
    if not classifier and data.target.dtype.kind not in "fiu":
        raise TrainingError(
            f"{plan.estimator} predicts numbers but column {data.target_name!r} holds labels; "
            "use a classifier"
        )
    x_train, x_test, y_train, y_test = train_test_split(
        data.features, data.target, test_size=plan.test_size, random_state=plan.random_state
    )
    started = time.perf_counter()
    estimator.fit(x_train, y_train)
    seconds = time.perf_counter() - started
    metadata = {
        "task": "classification" if classifier else "regression",
        "estimator": plan.estimator,
        "params": plan.params,
        **describe(estimator, data.feature_names),
        "metrics": _metrics(estimator, x_test, y_test, classifier),
        "training": {
            "plan": dataclasses.asdict(plan),
            "fingerprint": data.fingerprint,
            "n_train": len(x_train),
            "n_test": len(x_test),
            "seconds": round(seconds, 3),
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return estimator, metadata


def describe(estimator: Any, feature_names: list[str]) -> dict[str, Any]:
    """What the fitted estimator takes and gives, in Open Inference Protocol terms."""
    n_features = int(estimator.n_features_in_)
    outputs = [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
    described: dict[str, Any] = {"features": feature_names, "n_features": n_features}
    if is_classifier(estimator):
        classes = np.asarray(estimator.classes_).tolist()
        outputs = [
            {"name": "predict", "datatype": label_datatype(classes), "shape": [-1]},
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(classes)]},
        ]
        described["classes"] = classes
    described["inputs"] = [{"name": "features", "datatype": "FP64", "shape": [-1, n_features]}]
    described["outputs"] = outputs
    return described


def _metrics(estimator: Any, x: np.ndarray, y: np.ndarray, classifier: bool) -> dict[str, float]:
    predicted = estimator.predict(x)
    if classifier:
        return {
            "accuracy": round(float(accuracy_score(y, predicted)), 4),
            "f1_macro": round(float(f1_score(y, predicted, average="macro")), 4),
        }
    return {
        "r2": round(float(r2_score(y, predicted)), 4),
        "mae": round(float(mean_absolute_error(y, predicted)), 4),
        "rmse": round(float(np.sqrt(np.mean((y - predicted) ** 2))), 4),
    }


class TrainingLost(TrainingError):
    """The training's lock lapsed before it could save: the job goes back to the queue."""


@dataclasses.dataclass(frozen=True)
class Owner:
    """Whose training this is: the holder of the training lock in the Redis at `redis_url`.
    A training saves only while its job still holds the lock: once the lock lapsed (its
    worker was presumed dead), the job is someone else's to run again."""

    redis_url: str
    token: bytes

    def check(self) -> None:
        with redis.Redis.from_url(self.redis_url, socket_timeout=5) as conn:
            holder = conn.get(TRAINING_LOCK_KEY)
        if holder != self.token:
            raise TrainingLost(
                "this training lost its lock (its worker was presumed dead and the job may run "
                "again elsewhere); its model was not saved"
            )


def train_and_save(
    store: ModelStore, name: str, plan: TrainPlan, data_dir: Path, owner: Owner | None = None
) -> str:
    """Train a new version of `name` and write it to the store, if it is still `owner`'s
    training; returns its version."""
    estimator, metadata = train(plan, data_dir)
    if owner is not None:
        owner.check()
    version = store.save(name, estimator, metadata)
    logger.info("trained %s version %s: %s", name, version, metadata["metrics"])
    return version


def train_in_child(
    store: ModelStore,
    name: str,
    plan: TrainPlan,
    data_dir: Path,
    *,
    niceness: int,
    timeout_s: float,
    owner: Owner | None = None,
) -> str:
    """`train_and_save` in a fresh process at a lower CPU priority, stopped after `timeout_s`.
    Fitting and saving hold the GIL for long stretches; in a child they cannot slow the
    predictions this worker process serves, and the OS gives predictions the cores first.
    The child dies with this worker thread (a killed consumer leaves no fit running)."""
    if multiprocessing.current_process().daemon:
        # `huey_consumer -k process`: a daemon may not start children, and this worker is a
        # process of its own anyway, so no other worker shares its GIL.
        return train_and_save(store, name, plan, data_dir, owner)
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded process
    with context.Pool(1, initializer=_start_child, initargs=(niceness, os.getpid())) as child:
        pending = child.apply_async(train_and_save, (store, name, plan, data_dir, owner))
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


def ensure_demo_models(store: ModelStore, data_dir: Path) -> None:
    """Train and save each demo model this store has never had (first start, or a store from
    a release with fewer demos). A demo deleted on purpose is not trained again."""
    with store.lock():  # several workers may start at once: one trains, the others wait
        marker = store.root / BOOTSTRAPPED_FILE
        done = set(marker.read_text().split()) if marker.exists() else set()
        for name, demo in DEMOS.items():
            if name in done or store.latest(name) is not None:
                continue
            logger.info("model store %s has no %s: training the demo model", store.root, name)
            estimator, metadata = train(demo, data_dir)
            version = store.add_version(name, estimator, metadata)
            logger.info("saved %s version %s: %s", name, version, metadata["metrics"])
        if not set(DEMOS) <= done:
            marker.write_text("\n".join(sorted(done | set(DEMOS))) + "\n")


class Trainer:
    """One worker process's trainings: one at a time across every worker, each in a child."""

    def __init__(self, conn: redis.Redis, store: ModelStore, settings: Settings) -> None:
        self.conn = conn
        self.store = store
        self.settings = settings

    def train(self, name: str, plan: TrainPlan, owner: Owner) -> str:
        """Fit and save a new version of `name` in a child process, while `owner` (what
        `slot` yielded) still holds the training lock; its number."""
        return train_in_child(
            self.store,
            name,
            plan,
            self.settings.dataset_dir,
            niceness=self.settings.train_niceness,
            timeout_s=self.settings.train_timeout_s,
            owner=owner,
        )

    def retrain(self, wanted: set[str]) -> dict[str, str]:
        """Train each model (of `wanted`, or all) again on its data source when the data
        changed since its newest version; {name: new version}."""
        retrained: dict[str, str] = {}
        for name in self.store.names():
            if wanted and name not in wanted:
                continue
            newest = self.store.metadata(name, self.store.versions(name)[-1])
            plan = TrainPlan.from_metadata(newest)
            if plan is None:
                continue  # not trained by hueyserve: no data source to go back to
            try:
                fingerprint = datasets.fingerprint(plan.dataset, self.settings.dataset_dir)
                if fingerprint == newest["training"]["fingerprint"]:
                    logger.info(
                        "retrain %s: data unchanged since version %s", name, newest["version"]
                    )
                    continue
                with self.slot(wait_s=self.settings.train_timeout_s) as owner:
                    if owner is None:
                        raise TimeoutError("another training held the lock for too long")
                    retrained[name] = self.train(name, plan, owner)
            except Exception:  # one bad data source must not stop the others
                logger.exception("retrain %s failed", name)
        return retrained

    @contextlib.contextmanager
    def slot(self, wait_s: float | None) -> Iterator[Owner | None]:
        """One training at a time across every worker: yields the lock's Owner when this one
        may train, else None (after waiting up to `wait_s`; None: not at all). The lock
        lives HUEYSERVE_LEASE_S and is renewed while the training runs, so a worker that dies
        while training frees it soon."""
        lease_s = self.settings.lease_s
        # Not thread-local: redis-py would keep the token in the acquiring thread only, and
        # every renewal from the renewing thread would fail.
        lock: Lock = self.conn.lock(
            TRAINING_LOCK_KEY, timeout=lease_s, blocking_timeout=wait_s, thread_local=False
        )
        if not lock.acquire(blocking=wait_s is not None):
            yield None
            return
        done = threading.Event()

        def renew() -> None:
            while not done.wait(lease_s / 3):
                try:
                    lock.extend(lease_s, replace_ttl=True)
                except Exception as exc:  # never let the renewals stop: the lock would lapse
                    logger.warning("could not renew the training lock: %s", exc)

        threading.Thread(target=renew, name="training-lock", daemon=True).start()
        try:
            yield Owner(self.settings.redis_url, bytes(lock.local.token))
        finally:
            done.set()
            with contextlib.suppress(LockError, RedisError):  # lost: expired meanwhile
                lock.release()
