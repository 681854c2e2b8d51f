"""Fitting in a worker: train a planned version, describe it, save it; the demo models; one
training at a time across every worker.

Fitting runs in a spawned child process at a lower CPU priority (hueyserve.worker.child), so a
long fit cannot slow the predictions its worker serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
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
from hueyserve.artifacts import METADATA_FILE
from hueyserve.models import label_datatype
from hueyserve.training import DEMOS, TrainingError, TrainPlan, build_estimator
from hueyserve.wire import TRAINING_LOCK_KEY
from hueyserve.worker import progress
from hueyserve.worker.child import train_in_child
from hueyserve.worker.progress import Progress
from hueyserve.worker.publishing import entries
from hueyserve.worker.store import STAGING_DIR, ModelStore, write_estimator

if TYPE_CHECKING:  # the training child imports this module and needs no settings
    from hueyserve.settings import Settings
    from hueyserve.worker.repository import ModelRepository

logger = logging.getLogger(__name__)


def train(
    plan: TrainPlan, data_dir: Path, report: Progress | None = None
) -> tuple[Any, dict[str, Any]]:
    """Fit the plan's estimator on its data set; returns it with the metadata to save."""
    try:
        data = datasets.load(plan.dataset, data_dir, plan.target)
    except datasets.DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    if report is not None:
        report("data loaded")
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
    progress.fit(estimator, x_train, y_train, report)
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
    if report is not None:
        report("scored")
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


def train_to_folder(
    store: ModelStore,
    plan: TrainPlan,
    data_dir: Path,
    owner: Owner | None = None,
    report: Progress | None = None,
) -> str:
    """Train a version as planned and write it to a staging folder of the store, if it is
    still `owner`'s training; the folder's path (the caller adds it to the catalog)."""
    estimator, metadata = train(plan, data_dir, report)
    if owner is not None:
        owner.check()
    folder = store.root / STAGING_DIR / f"trained-{os.getpid()}-{time.time_ns()}"
    folder.mkdir(parents=True)
    write_estimator(folder, estimator, metadata)
    if report is not None:
        report("saved")
    logger.info("trained %s on %s: %s", plan.estimator, plan.dataset, metadata["metrics"])
    return str(folder)


def ensure_demo_models(store: ModelStore, data_dir: Path) -> None:
    """Train each demo model into a folder that lacks it, as if dropped there by hand (tests
    and benchmarks; a deployment's workers create them once through the catalog instead)."""
    with store.lock():
        for name, demo in DEMOS.items():
            if store.latest(name) is None:
                estimator, metadata = train(demo, data_dir)
                with store.staging() as staging:
                    write_estimator(staging, estimator, {**metadata, "name": name, "version": "1"})
                    store.install(name, "1", staging)


class Trainer:
    """One worker process's trainings: one at a time across every worker, each in a child."""

    def __init__(self, conn: redis.Redis, repository: ModelRepository, settings: Settings) -> None:
        self.conn = conn
        self.repository = repository
        self.settings = settings

    def train(self, name: str, plan: TrainPlan, owner: Owner, job_id: str | None = None) -> str:
        """Fit a new version of `name` in a child process, while `owner` (what `slot` yielded)
        still holds the training lock, and add it to the catalog (checked like an import;
        active unless an operator pinned another); its number. A job's training reports
        its progress (hueyserve.worker.progress)."""
        report = None
        if job_id is not None:
            report = Progress(
                self.settings.redis_url,
                job_id,
                ttl_s=self.settings.result_ttl_s,
                events_max_len=self.settings.events_max_len,
            )
        folder = Path(
            train_in_child(
                self.repository.store,
                plan,
                self.settings.dataset_dir,
                niceness=self.settings.train_niceness,
                timeout_s=self.settings.train_timeout_s,
                owner=owner,
                report=report,
            )
        )
        try:
            metadata = json.loads((folder / METADATA_FILE).read_text())
            entry, _ = self.repository.add(name, folder, metadata, report=report)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return max(entry.versions, key=int)

    def retrain(self, wanted: set[str]) -> dict[str, str]:
        """Train each model (of `wanted`, or all) again on its data source when the data
        changed since its newest version; {name: new version}."""
        retrained: dict[str, str] = {}
        for name, entry in sorted(entries(self.conn).items()):
            if wanted and name not in wanted:
                continue
            newest = entry.versions[entry.version_list()[-1]]
            plan = TrainPlan.from_metadata(newest)
            if plan is None:
                continue  # not trained by hueyserve: no data source to go back to
            try:
                fingerprint = datasets.fingerprint(plan.dataset, self.settings.dataset_dir)
                if fingerprint == newest["training"]["fingerprint"]:
                    logger.info(
                        "retrain %s: data unchanged since version %s", name, newest.get("version")
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
