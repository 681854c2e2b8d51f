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


#: Rows of text travel as one fixed-width array: every row as wide as the longest. A request
#: whose rows would take more characters than this (16 MiB of memory) is refused.
MAX_TEXT_CELLS = 4 * 1024 * 1024


def text_rows(texts: list[str], *, max_rows: int) -> np.ndarray:
    """A text model's rows as the wire carries them (a 1-D str array), or the 4xx."""
    check_count(len(texts), max_rows=max_rows)
    longest = max(len(text) for text in texts)
    if longest * len(texts) > MAX_TEXT_CELLS:
        raise PayloadTooLarge(
            f"{len(texts)} texts of up to {longest} characters: every row is held as wide as "
            f"the longest, at most {MAX_TEXT_CELLS} characters in all; send long texts in "
            "requests of their own"
        )
    return np.asarray(texts, dtype=str)


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
