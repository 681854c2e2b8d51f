"""The KServe v1 codec: `instances` in, `predictions` out (bodies in hueyserve.api.schemas)."""

from __future__ import annotations

from typing import Any

import numpy as np

from hueyserve.api.inputs import check_count, check_features, expects
from hueyserve.errors import InvalidInput
from hueyserve.models import ModelVersion, Outputs


def decode_instances(
    model: ModelVersion, instances: list[list[float]], *, max_rows: int
) -> np.ndarray:
    """KServe v1 instances as a checked float array, or the 4xx that says what to fix."""
    check_count(len(instances), max_rows=max_rows)
    for index, row in enumerate(instances):
        if len(row) != model.n_features:
            raise InvalidInput(f"instances[{index}] has {len(row)} features; {expects(model)}")
    return check_features(model, np.asarray(instances, dtype=np.float64), max_rows=max_rows)


def encode_predictions(model: ModelVersion, outputs: Outputs) -> list[Any]:
    """The worker's output columns as one v1 prediction per row: a regressor's number, or a
    classifier's `{"class": label, "probabilities": {label: p, ...}}`."""
    labels = outputs["predict"]
    if model.classes is None or "predict_proba" not in outputs:
        return labels
    return [
        {"class": label, "probabilities": dict(zip(model.classes, row, strict=True))}
        for label, row in zip(labels, outputs["predict_proba"], strict=True)
    ]
