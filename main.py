"""The HTTP API. Run: `uvicorn main:app --log-config config/logger.config`.

Routes only: validation lives in hueyserve.schemas, the work in hueyserve.service, and every
domain error becomes its HTTP answer in the one handler below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

import core
from hueyserve.cache import PredictionCache
from hueyserve.catalog import ModelCatalog
from hueyserve.errors import ServiceError
from hueyserve.queue import TaskQueue
from hueyserve.schemas import (
    ErrorBody,
    JobAccepted,
    JobPublic,
    JobSubmit,
    PredictRequest,
    PredictResponse,
)
from hueyserve.service import PredictService
from hueyserve.settings import settings
from hueyserve.validation import validation_failure

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    queue = TaskQueue(
        core.huey,
        url=settings.redis_url,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.redis_socket_timeout_s,
        record_ttl_s=settings.result_ttl_s,
        max_waiters=settings.max_sync_waiters,
    )
    catalog = ModelCatalog(queue.client, resync_s=settings.catalog_resync_s)
    app.state.service = PredictService(
        settings=settings,
        queue=queue,
        catalog=catalog,
        cache=PredictionCache(settings.cache_size),
        task=core.predict,
    )
    with contextlib.suppress(ServiceError, RedisError, OSError):
        await catalog.resync()  # answer the first request with models known; else follow() retries
    follower = asyncio.create_task(catalog.follow(), name="model-catalog")
    try:
        yield
    finally:
        follower.cancel()
        # Bounded: shutdown must never hang on a Redis call that swallowed the cancellation.
        await asyncio.wait({follower}, timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.aclose(), timeout=2.0)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 404, 413, 422, 503, 504)
}

app = FastAPI(
    title="hueyserve",
    summary="Serve scikit-learn models on CPUs through a Huey task queue on Redis.",
    version="0.1.0",
    lifespan=lifespan,
    responses=ERRORS,
)


def get_service(request: Request) -> PredictService:
    service: PredictService = request.app.state.service
    return service


Service = Annotated[PredictService, Depends(get_service)]


# --- errors -------------------------------------------------------------------------------


@app.exception_handler(ServiceError)
async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    if exc.status_code >= 500:
        logger.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    failure = validation_failure(exc.errors(), request.headers.get("content-type"))
    return await service_error(request, failure)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404 no such route, 405 wrong method) in our error format."""
    message = f"{exc.detail}: {request.method} {request.url.path}; see /docs for the routes"
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


# --- KServe v1 predict and jobs --------------------------------------------------------------


@app.post(
    "/v1/models/{name}:predict",
    response_model=PredictResponse,
    responses={202: {"model": JobAccepted, "description": "With `Prefer: respond-async`."}},
    summary="Predict (blocking), or submit a job with `Prefer: respond-async`",
)
async def predict(
    name: str,
    body: PredictRequest,
    service: Service,
    response: Response,
    prefer: Annotated[str | None, Header()] = None,
) -> PredictResponse | JSONResponse:
    if prefer and "respond-async" in prefer.lower():
        accepted = await service.submit(name, body.instances, priority=body.priority)
        return accepted_response(accepted)
    answer = await service.predict(
        name, body.instances, priority=body.priority, timeout_s=body.timeout
    )
    response.headers["X-Cache"] = "hit" if answer.cached else "miss"
    response.headers["X-Model-Version"] = answer.model.version
    if answer.job_id:
        response.headers["X-Job-Id"] = answer.job_id
    return PredictResponse(
        predictions=answer.predictions,
        model_name=answer.model.name,
        model_version=answer.model.version,
    )


@app.post("/v1/jobs", status_code=202, response_model=JobAccepted, summary="Submit an async job")
async def submit_job(body: JobSubmit, service: Service) -> JSONResponse:
    accepted = await service.submit(body.model, body.instances, priority=body.priority)
    return accepted_response(accepted)


@app.get("/v1/jobs/{job_id}", response_model=JobPublic, summary="Status and result of a job")
async def get_job(job_id: str, service: Service) -> JobPublic:
    return await service.job(job_id)


def accepted_response(accepted: JobAccepted) -> JSONResponse:
    return JSONResponse(
        accepted.model_dump(mode="json"),
        status_code=202,
        headers={"Location": accepted.location, "Preference-Applied": "respond-async"},
    )


# --- health -------------------------------------------------------------------------------


@app.get("/v2/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@app.get("/v2/health/ready", summary="Readiness: Redis, a worker and a model are there")
async def ready(service: Service) -> JSONResponse:
    reasons = await service.readiness()
    if reasons:
        return JSONResponse({"ready": False, "reasons": reasons}, status_code=503)
    return JSONResponse({"ready": True})


@app.get("/health", summary="Details: Redis latency, queue depth, workers, models, cache")
async def health(service: Service) -> JSONResponse:
    reasons = await service.readiness()
    details = {"ready": not reasons, "reasons": reasons, **await service.details()}
    return JSONResponse(details, status_code=200 if not reasons else 503)
