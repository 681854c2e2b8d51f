"""Request and response bodies of KServe v1, jobs and model administration (the Open
Inference Protocol v2's live in hueyserve.api.v2)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from hueyserve.jobs import JobKind, JobStatus

#: One feature value: a real JSON number. Strings, booleans, null, NaN and Infinity are refused.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Row = Annotated[list[Feature], Field(min_length=1)]
Instances = Annotated[list[Row], Field(min_length=1, description="Rows of features.")]
#: Longest string any request field may hold (names, ids, parameter values).
MAX_STRING = 4096
#: Longest string one text instance may hold (the body limit bounds them all together).
MAX_TEXT = 1_000_000
Text = Annotated[str, Field(strict=True, max_length=MAX_TEXT)]
Texts = Annotated[list[Text], Field(min_length=1, description="One text per row.")]
#: Strict: `false` or `50.0` is not a priority.
Priority = Annotated[int, Field(strict=True, ge=0, le=100, description="0-100; higher runs first.")]
#: Longest duration a request may ask for (a job's deadline, a wait): longer ones overflow
#: the dates they become, and nobody means them.
MAX_DURATION_S = 365 * 24 * 3600
#: Seconds, above 0 and at most MAX_DURATION_S (the field's description says of what).
Duration = Annotated[float, Field(gt=0, le=MAX_DURATION_S)]

EXAMPLE_ROWS = [
    [0.0381, 0.0507, 0.0617, 0.0219, -0.0442, -0.0348, -0.0434, -0.0026, 0.0199, -0.0176],
    [-0.0019, -0.0446, -0.0515, -0.0263, -0.0084, -0.0192, 0.0744, -0.0395, -0.0683, -0.0922],
]
EXAMPLE_JSON: list[JsonValue] = [list[JsonValue](row) for row in EXAMPLE_ROWS]


class PredictRequest(BaseModel):
    """KServe v1 predict body, plus optional queue options."""

    model_config = ConfigDict(
        str_max_length=MAX_STRING,
        json_schema_extra={
            "examples": [
                {"instances": EXAMPLE_JSON},
                {"instances": EXAMPLE_JSON[:1], "priority": 50, "timeout": 5},
            ]
        },
    )

    instances: Instances
    priority: Priority | None = None
    timeout: Duration | None = Field(
        default=None,
        description="Sync: seconds to wait for the result. With `Prefer: respond-async`: "
        "seconds the job may wait in the queue before it expires.",
    )


class TextPredictRequest(BaseModel):
    """KServe v1 predict body of a text model (one whose input is BYTES): one string per
    instance."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"instances": ["a fine film", "dull and long"]}]}
    )

    instances: Texts
    priority: Priority | None = None
    timeout: Duration | None = None


class PredictResponse(BaseModel):
    """KServe v1 answer: one prediction per instance, in order. A regressor predicts a number;
    a classifier `{"class": label, "probabilities": {label: p, ...}}`."""

    predictions: list[Any]
    model_name: str
    model_version: str


class JobSubmit(BaseModel):
    """An explicit async job: which model, which rows, how urgent."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "diabetes", "instances": EXAMPLE_JSON}]},
    )

    model: str = Field(min_length=1, max_length=200)
    version: str | None = Field(
        default=None, max_length=200, description="A version; the active one if unset."
    )
    #: Checked once the model is known (hueyserve.api.v1.rows_of): numbers, or text.
    instances: list[JsonValue] = Field(
        min_length=1,
        description="Rows of numbers; for a text model (input BYTES), one string per row.",
    )
    priority: Priority | None = None
    timeout: Duration | None = Field(
        default=None,
        description="Seconds the job may wait in the queue; past them it is not run and "
        "reads `expired`.",
    )


class JobAccepted(BaseModel):
    """Answer to an async submission (202): where to read the result."""

    job_id: str
    status: JobStatus
    location: str
    model_name: str
    model_version: str | None = None


class JobPublic(BaseModel):
    """Everything known about a job; `result` once done, `error` once failed."""

    job_id: str
    kind: JobKind = JobKind.PREDICT
    status: JobStatus
    model_name: str | None = None
    model_version: str | None = None
    priority: int | None = None
    instances: int | None = None
    attempts: int = 0
    worker: str | None = Field(default=None, description="host:pid of the worker that ran it last.")
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    stage: str | None = Field(
        default=None, description="A long job's last stage (a training's: data loaded, ...)."
    )
    progress: float | None = Field(
        default=None, ge=0, le=1, description="How far its stage has come, where known."
    )
    result: dict[str, Any] | None = None
    error: str | None = None


class ModelList(BaseModel):
    """KServe v1 `GET /v1/models`."""

    models: list[str]


class ModelStatus(BaseModel):
    """KServe v1 `GET /v1/models/{name}`, with the versions."""

    name: str
    ready: bool
    active_version: str
    versions: list[str]


class TrainRequest(BaseModel):
    """A training job. Unset fields come from the model's active version (so `{}` retrains it
    as it was); `params` are merged over the previous ones when the estimator stays."""

    model_config = ConfigDict(
        extra="forbid",
        str_max_length=MAX_STRING,
        json_schema_extra={
            "examples": [
                {},
                {"params": {"n_estimators": 50, "max_depth": 6}},
                {"dataset": "iris", "estimator": "RandomForestClassifier"},
                {"dataset": "houses.csv", "target": "price", "estimator": "Ridge"},
            ]
        },
    )

    dataset: str | None = Field(
        default=None,
        max_length=200,
        description="iris, diabetes, wine, breast_cancer, or a .csv in HUEYSERVE_DATASET_DIR.",
    )
    target: str | None = Field(default=None, max_length=200, description="CSV target column.")
    estimator: str | None = Field(default=None, description="A scikit-learn estimator class.")
    params: dict[str, JsonValue] | None = Field(
        default=None, description="Estimator parameters, checked by scikit-learn."
    )
    test_size: float | None = Field(default=None, gt=0, lt=1, description="Held-out share.")
    random_state: int | None = Field(default=None, ge=0, description="Split and estimator seed.")

    def plan_fields(self) -> dict[str, Any]:
        return self.model_dump()


class ReloadRequest(BaseModel):
    """Which version to make active; none means the newest (and unpins the model)."""

    model_config = ConfigDict(extra="forbid", str_max_length=MAX_STRING)

    version: str | None = Field(default=None, max_length=20)


class ReloadResult(BaseModel):
    model_name: str
    active_version: str
    previous_version: str | None
    pinned: bool
    job_id: str


class ErrorBody(BaseModel):
    """Every error answer: what is wrong and how to fix it."""

    error: str
    job_id: str | None = None


class ImportResult(BaseModel):
    """A version imported, checked by a worker (loaded, signature, smoke prediction) and
    added to the catalog."""

    model_name: str
    model_version: str
    active_version: str
    pinned: bool
    runtime: str | None = None
    inputs: list[dict[str, Any]] | None = None
    outputs: list[dict[str, Any]] | None = None
    files: dict[str, Any] | None = None
    job_id: str


class DeleteResult(BaseModel):
    """What is left of a model after a delete (nothing, when the whole model went)."""

    model_name: str
    deleted_version: str | None = Field(description="None: the whole model was deleted.")
    versions: list[str]
    active_version: str | None
    job_id: str
