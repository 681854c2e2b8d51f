"""Training: which estimators may be trained, how a training job is planned and run, and the
metadata (signature, metrics, data source) saved with every version.

The API plans and validates a job (`plan`, bad parameters are its 422) before enqueueing it;
a worker runs it (`train`). The plan is stored in the metadata, so a scheduled retrain can
repeat it on fresh data.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, is_classifier
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, f1_score, mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split

from hueyserve import datasets
from hueyserve.catalog import label_datatype
from hueyserve.store import ModelStore

logger = logging.getLogger(__name__)

#: Estimators a training job may use: each saves with skops and loads with TRUSTED_TYPES.
ESTIMATORS: dict[str, type[BaseEstimator]] = {
    cls.__name__: cls
    for cls in (
        RandomForestRegressor,
        RandomForestClassifier,
        ExtraTreesRegressor,
        ExtraTreesClassifier,
        GradientBoostingRegressor,
        GradientBoostingClassifier,
        LogisticRegression,
        Ridge,
    )
}


class TrainingError(ValueError):
    """A training job that cannot work as asked; the message says what to change."""


@dataclass(frozen=True)
class TrainPlan:
    """Everything needed to train a version again: data, estimator and split."""

    dataset: str
    estimator: str
    params: dict[str, Any]
    target: str | None = None
    test_size: float = 0.2
    random_state: int = 0

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> TrainPlan | None:
        """The plan a version was trained with, or None for a model saved some other way."""
        saved = metadata.get("training", {}).get("plan")
        return cls(**saved) if saved else None


BOOTSTRAPPED_FILE = ".demos"  #: in the store root: demo models already created once

#: The demo models an empty store starts with.
DEMOS: dict[str, TrainPlan] = {
    "diabetes": TrainPlan("diabetes", "RandomForestRegressor", {"n_estimators": 100}),
    "iris": TrainPlan("iris", "LogisticRegression", {"max_iter": 1000}),
}


def plan(
    previous: dict[str, Any] | None,
    *,
    dataset: str | None = None,
    estimator: str | None = None,
    params: dict[str, Any] | None = None,
    target: str | None = None,
    test_size: float | None = None,
    random_state: int | None = None,
    data_dir: Path,
) -> TrainPlan:
    """A checked plan for a new version: what is not given comes from the previous version's
    plan (`previous` is its metadata); `params` are merged over the previous ones when the
    estimator stays the same. Raises TrainingError (the API's 422)."""
    base = TrainPlan.from_metadata(previous or {})
    estimator = estimator or (base.estimator if base else None)
    dataset = dataset or (base.dataset if base else None)
    if estimator is None or dataset is None:
        raise TrainingError(
            f"a new model needs 'dataset' and 'estimator' (one of {', '.join(ESTIMATORS)})"
        )
    if base and base.estimator == estimator:
        params = {**base.params, **(params or {})}
    result = TrainPlan(
        dataset=dataset,
        estimator=estimator,
        params=params or {},
        target=target if target is not None else (base.target if base else None),
        test_size=test_size if test_size is not None else (base.test_size if base else 0.2),
        random_state=(
            random_state if random_state is not None else (base.random_state if base else 0)
        ),
    )
    build_estimator(result)
    try:
        datasets.check_source(result.dataset, data_dir)
    except datasets.DatasetError as exc:
        raise TrainingError(str(exc)) from exc
    return result


def build_estimator(plan: TrainPlan) -> Any:
    """An unfitted estimator with the plan's parameters, checked by scikit-learn itself."""
    cls = ESTIMATORS.get(plan.estimator)
    if cls is None:
        raise TrainingError(
            f"unknown estimator {plan.estimator!r}; choose one of {', '.join(ESTIMATORS)}"
        )
    if plan.params.get("n_jobs") not in (None, 1):
        raise TrainingError(
            "n_jobs: training uses one core, so that predictions keep the others; leave it out"
        )
    estimator = cls()
    try:
        estimator.set_params(**plan.params)
        if "random_state" in estimator.get_params() and "random_state" not in plan.params:
            estimator.set_params(random_state=plan.random_state)
        # scikit-learn checks parameter types and ranges only in fit(); ask it now instead.
        estimator._validate_params()
    except (ValueError, TypeError) as exc:
        raise TrainingError(f"{plan.estimator}: {exc}") from exc
    return estimator


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


def train_and_save(store: ModelStore, name: str, plan: TrainPlan, data_dir: Path) -> str:
    """Train a new version of `name` and write it to the store; returns its version."""
    estimator, metadata = train(plan, data_dir)
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
) -> str:
    """`train_and_save` in a fresh process at a lower CPU priority, stopped after `timeout_s`.
    Fitting and saving hold the GIL for long stretches; in a child they cannot slow the
    predictions this worker process serves, and the OS gives predictions the cores first."""
    if multiprocessing.current_process().daemon:
        # `huey_consumer -k process`: a daemon may not start children, and this worker is a
        # process of its own anyway, so no other worker shares its GIL.
        return train_and_save(store, name, plan, data_dir)
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a threaded process
    with context.Pool(1, initializer=os.nice, initargs=(niceness,)) as child:
        pending = child.apply_async(train_and_save, (store, name, plan, data_dir))
        try:
            return str(pending.get(timeout_s))
        except multiprocessing.TimeoutError:
            raise TrainingError(
                f"training took longer than {timeout_s:g}s (HUEYSERVE_TRAIN_TIMEOUT_S) and was "
                "stopped; train a smaller model or raise the limit"
            ) from None


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
