"""Training the demo models from data sets bundled with scikit-learn (no download)."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.ensemble import RandomForestRegressor
from sklearn.metrics import mean_absolute_error, r2_score
from sklearn.model_selection import train_test_split

from hueyserve.store import ModelStore

logger = logging.getLogger(__name__)

DEMO_MODEL = "diabetes"


def train_diabetes(*, n_estimators: int = 100, random_state: int = 0) -> tuple[Any, dict[str, Any]]:
    """A RandomForestRegressor on the diabetes data set, with its metadata and test metrics."""
    data = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.2, random_state=random_state
    )
    model = RandomForestRegressor(n_estimators=n_estimators, random_state=random_state)
    model.fit(x_train, y_train)
    predicted = model.predict(x_test)
    metadata = {
        "task": "regression",
        "estimator": type(model).__name__,
        "params": {"n_estimators": n_estimators, "random_state": random_state},
        "dataset": "sklearn.datasets.load_diabetes",
        "features": list(data.feature_names),
        "n_features": int(data.data.shape[1]),
        "metrics": {
            "r2": round(float(r2_score(y_test, predicted)), 4),
            "mae": round(float(mean_absolute_error(y_test, predicted)), 4),
            "rmse": round(float(np.sqrt(np.mean((y_test - predicted) ** 2))), 4),
        },
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return model, metadata


def ensure_demo_models(store: ModelStore) -> None:
    """Train and save the demo model when the store has none (first start)."""
    with store.lock():  # several workers may start at once: one trains, the others wait
        if store.latest(DEMO_MODEL) is not None:
            return
        logger.info("model store %s is empty: training the %s demo model", store.root, DEMO_MODEL)
        model, metadata = train_diabetes()
        version = store.add_version(DEMO_MODEL, model, metadata)
    logger.info("saved %s version %s: %s", DEMO_MODEL, version, metadata["metrics"])
