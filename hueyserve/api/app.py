"""The FastAPI application object, without its routes (main.py adds those): the lifespan
that runs the services, the middleware stack, and the OpenAPI schema's raw-body routes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from huey import Huey
from pydantic.json_schema import models_json_schema
from starlette.middleware import Middleware

from hueyserve.api import paths, v2
from hueyserve.api.answers import CachedAnswers
from hueyserve.api.docs import add_docs
from hueyserve.api.guard import RequestGuard
from hueyserve.api.schemas import ErrorBody, PredictRequest, TextPredictRequest
from hueyserve.api.services import Tasks, running
from hueyserve.api.timing import RequestTimer
from hueyserve.settings import Settings

UPLOAD_OVERHEAD_BYTES = 1024 * 1024
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)
}


def create_app(settings: Settings, huey: Huey, tasks: Tasks) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running(settings, huey, tasks) as services:
            app.state.services = services
            yield

    app = FastAPI(
        title="hueyserve",
        summary="Serve scikit-learn models on CPUs through a Huey task queue on Redis.",
        version="0.2.0",
        lifespan=lifespan,
        responses=ERRORS,
        docs_url=None,  # served offline by hueyserve.api.docs instead
        redoc_url=None,  # ReDoc loads from a CDN
        openapi_url=paths.OPENAPI,
        # Outermost first, in the order requests travel: the timer sees every answer; the
        # guard refuses before the answer cache reads a body.
        middleware=[
            Middleware(RequestTimer),
            Middleware(
                RequestGuard,
                predict_keys=settings.keys("api"),
                admin_keys=settings.keys("admin"),
                max_body_bytes=settings.max_body_bytes,
                # an import's artifacts, plus room for its metadata and multipart framing
                max_upload_bytes=settings.max_artifact_bytes + UPLOAD_OVERHEAD_BYTES,
                body_timeout_s=settings.body_timeout_s,
                key_salt=settings.secret_value(),
                allowed_origins=settings.origins(),
            ),
            Middleware(CachedAnswers),
        ],
    )
    default_openapi = app.openapi

    def openapi_with_raw_bodies() -> dict[str, Any]:
        """FastAPI's schema, plus the bodies of the routes that read theirs raw (v2 infer, for
        binary tensors; v1 predict, to answer repeated bodies before parsing them)."""
        if app.openapi_schema is None:
            schema = default_openapi()
            _, defs = models_json_schema(
                [
                    (v2.InferenceRequest, "validation"),
                    (PredictRequest, "validation"),
                    (TextPredictRequest, "validation"),
                ],
                ref_template="#/components/schemas/{model}",
            )
            schema["components"]["schemas"].update(defs["$defs"])
        return app.openapi_schema or {}

    app.openapi = openapi_with_raw_bodies  # type: ignore[method-assign]
    add_docs(app)
    return app
