"""The KServe v1 codec: `instances` in, `predictions` out (bodies in hueyserve.api.schemas)."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import TypeAdapter, ValidationError

from hueyserve.api.inputs import check_count, check_features, expects, text_rows
from hueyserve.api.schemas import Instances, Texts
from hueyserve.api.validation import validation_failure
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


_ROWS: TypeAdapter[list[list[float]]] = TypeAdapter(Instances)
_TEXTS: TypeAdapter[list[str]] = TypeAdapter(Texts)


def rows_of(model: ModelVersion, instances: list[Any], *, max_rows: int) -> np.ndarray:
    """A job's `instances` (any JSON so far) checked as the model takes them: rows of numbers,
    or one string per row for a text model; the 422 names the instance that is wrong."""
    try:
        if model.takes_text:
            return decode_texts(model, _TEXTS.validate_python(instances), max_rows=max_rows)
        rows = _ROWS.validate_python(instances)
    except ValidationError as exc:
        problems = exc.errors(include_url=False, include_input=False)
        located = [{**p, "loc": ("body", "instances", *p["loc"])} for p in problems]
        failure = validation_failure(located, "application/json")
        raise InvalidInput(
            f"{text_input(model)}; {failure.message}" if model.takes_text else failure.message
        ) from None
    return decode_instances(model, rows, max_rows=max_rows)


def decode_texts(model: ModelVersion, instances: list[str], *, max_rows: int) -> np.ndarray:
    """A text model's instances (one string each) as the rows the workers take."""
    return text_rows(instances, max_rows=max_rows)


def text_input(model: ModelVersion) -> str:
    """What a 422 for a text model says it takes."""
    name = model.inputs[0]["name"]
    return f"model {model.name!r} takes text (input {name!r}): one string per instance"


def encode_predictions(model: ModelVersion, outputs: Outputs) -> list[Any]:
    """The worker's output columns as one v1 prediction per row: a classifier's
    `{"class": label, "probabilities": {label: p, ...}}`, the value of a model with one
    output, or `{output: value, ...}` for a model with several."""
    names = [o["name"] for o in model.outputs if o["name"] in outputs] or list(outputs)
    if model.classes is not None and names[:2] == ["predict", "predict_proba"]:
        keys = [str(label) for label in model.classes]  # JSON object keys are strings
        others = names[2:]  # outputs a model's postprocess adds
        return [
            {
                "class": label,
                "probabilities": dict(zip(keys, row, strict=True)),
                **{name: outputs[name][index] for name in others},
            }
            for index, (label, row) in enumerate(
                zip(outputs["predict"], outputs["predict_proba"], strict=True)
            )
        ]
    if len(names) == 1:
        return outputs[names[0]]
    rows = len(outputs[names[0]])
    return [{name: outputs[name][row] for name in names} for row in range(rows)]
