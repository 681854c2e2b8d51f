"""The wire protocol: request and response bodies of the HTTP API (KServe v1 and jobs)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from hueyserve.jobs import JobStatus

#: One feature value: a real JSON number. Strings, booleans, null, NaN and Infinity are refused.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Instances = Annotated[list[list[Feature]], Field(min_length=1, description="Rows of features.")]
Priority = Annotated[int, Field(ge=0, le=100, description="0-100; higher runs first.")]

EXAMPLE_ROWS = [
    [0.0381, 0.0507, 0.0617, 0.0219, -0.0442, -0.0348, -0.0434, -0.0026, 0.0199, -0.0176],
    [-0.0019, -0.0446, -0.0515, -0.0263, -0.0084, -0.0192, 0.0744, -0.0395, -0.0683, -0.0922],
]
EXAMPLE_JSON: list[JsonValue] = [list[JsonValue](row) for row in EXAMPLE_ROWS]


class PredictRequest(BaseModel):
    """KServe v1 predict body, plus optional queue options."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"instances": EXAMPLE_JSON},
                {"instances": EXAMPLE_JSON[:1], "priority": 50, "timeout": 5},
            ]
        }
    )

    instances: Instances
    priority: Priority | None = None
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds to wait for the result (sync only)."
    )


class PredictResponse(BaseModel):
    """KServe v1 answer: one prediction per instance, in order."""

    predictions: list[Any]
    model_name: str
    model_version: str


class JobSubmit(BaseModel):
    """An explicit async job: which model, which rows, how urgent."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"model": "diabetes", "instances": EXAMPLE_JSON}]}
    )

    model: str = Field(min_length=1, max_length=200)
    instances: Instances
    priority: Priority | None = None


class JobAccepted(BaseModel):
    """Answer to an async submission (202): where to read the result."""

    job_id: str
    status: JobStatus
    location: str
    model_name: str
    model_version: str


class JobPublic(BaseModel):
    """Everything known about a job; `result` once done, `error` once failed."""

    job_id: str
    status: JobStatus
    model_name: str | None = None
    model_version: str | None = None
    priority: int | None = None
    instances: int | None = None
    attempts: int = 0
    created_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    result: dict[str, Any] | None = None
    error: str | None = None


class ErrorBody(BaseModel):
    """Every error answer: what is wrong and how to fix it."""

    error: str
    job_id: str | None = None
