"""Checks every protocol's features pass before they are queued: the model's width, the row
limit, finite values that fit in float32 (scikit-learn's trees compute in float32)."""

from __future__ import annotations

import numpy as np

from hueyserve.errors import InvalidInput, PayloadTooLarge
from hueyserve.models import ModelVersion

FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_features(model: ModelVersion, features: np.ndarray, *, max_rows: int) -> np.ndarray:
    """A [rows, n_features] float64 array the model can take (a text model: rows of
    strings), or the 4xx saying why not."""
    if model.takes_text:
        check_count(len(features), max_rows=max_rows)
        return features
    if features.ndim != 2 or features.shape[1] != model.n_features:
        raise InvalidInput(f"got shape {list(features.shape)}; {expects(model)}")
    check_count(features.shape[0], max_rows=max_rows)
    if features.size and np.abs(features).max() > FLOAT32_MAX:
        raise InvalidInput(f"a feature value is beyond ±{FLOAT32_MAX:.3g}; scale the input")
    if not np.isfinite(features).all():
        raise InvalidInput("NaN and Infinity are not allowed as feature values")
    return features


def check_count(rows: int, *, max_rows: int) -> None:
    if rows > max_rows:
        raise PayloadTooLarge(
            f"{rows} instances in one request; the limit is "
            f"{max_rows} (HUEYSERVE_MAX_INSTANCES): split the request"
        )
    if rows == 0:
        raise InvalidInput("no instances: send at least one row")


def expects(model: ModelVersion) -> str:
    names = f" ({', '.join(model.features)})" if model.features else ""
    return f"model {model.name!r} expects {model.n_features} features per row{names}"
