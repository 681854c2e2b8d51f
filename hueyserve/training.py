"""Training plans: which estimators may be trained and how a training job is planned.

The API plans and validates a job (`plan`, bad parameters are its 422) before enqueueing it;
a worker fits it (hueyserve.worker.fitting). The plan is stored in the metadata, so a
scheduled retrain can repeat it on fresh data. Queued train tasks carry it as JSON
(hueyserve.serializer), so its fields are part of the wire format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sklearn.base import BaseEstimator
from sklearn.ensemble import (
    ExtraTreesClassifier,
    ExtraTreesRegressor,
    GradientBoostingClassifier,
    GradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge

from hueyserve import datasets

#: Estimators a training job may use: each saves with skops and loads with its trusted types.
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
        datasets.check_source(result.dataset, data_dir, result.target)
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
