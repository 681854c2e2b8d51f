"""The HTTP API. Run: `uvicorn main:app --log-config config/logger.config`.

Routes only: KServe v1, the Open Inference Protocol v2, jobs, the model life cycle and health.
Bodies live in hueyserve.schemas and hueyserve.v2_protocol, the work in hueyserve.service, and
every domain error becomes its HTTP answer in the one handler below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic.json_schema import models_json_schema
from redis import RedisError
from starlette.convertors import StringConvertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

import core
from hueyserve import metrics, v2_protocol
from hueyserve.cache import PredictionCache
from hueyserve.catalog import ModelCatalog, ModelVersion
from hueyserve.errors import ServiceError
from hueyserve.guard import RequestGuard
from hueyserve.hot_path import CachedAnswers
from hueyserve.queue import TaskQueue
from hueyserve.schemas import (
    ErrorBody,
    JobAccepted,
    JobPublic,
    JobSubmit,
    ModelList,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    ReloadRequest,
    ReloadResult,
    TrainRequest,
    v1_predictions,
)
from hueyserve.service import MODEL_NAME, Prediction, PredictService, Tasks
from hueyserve.settings import settings
from hueyserve.validation import parse_json_body, validation_failure

logger = logging.getLogger(__name__)


class ModelNameConvertor(StringConvertor):
    """`{name:model}`: a model name never holds ':' or '/', so `GET /v1/models/m:predict` is
    a wrong method on the predict route, not a lookup of a model called 'm:predict'."""

    regex = MODEL_NAME.pattern


register_url_convertor("model", ModelNameConvertor())


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    queue = TaskQueue(
        core.huey,
        url=settings.redis_url,
        connect_timeout_s=settings.redis_connect_timeout_s,
        socket_timeout_s=settings.redis_socket_timeout_s,
        record_ttl_s=settings.result_ttl_s,
        max_waiters=settings.max_sync_waiters,
        max_connections=settings.redis_max_connections,
        pool_timeout_s=settings.redis_pool_timeout_s,
        max_depth=settings.max_queue_depth,
    )
    catalog = ModelCatalog(queue.client, resync_s=settings.catalog_resync_s)
    app.state.service = PredictService(
        settings=settings,
        queue=queue,
        catalog=catalog,
        cache=PredictionCache(settings.cache_size, where="api"),
        tasks=Tasks(predict=core.predict, train=core.train, reload=core.reload_model),
    )
    with contextlib.suppress(ServiceError, RedisError, OSError):
        await queue.warm()
        await catalog.resync()  # answer the first request with models known; else follow() retries
    background = {
        asyncio.create_task(catalog.follow(), name="model-catalog"),
        asyncio.create_task(queue.results.run(), name="result-listener"),
    }
    with contextlib.suppress(TimeoutError):  # Redis down: requests get 503s until it is back
        await asyncio.wait_for(queue.results.connected.wait(), timeout=2.0)
    try:
        yield
    finally:
        for task in background:
            task.cancel()
        # Bounded: shutdown must never hang on a Redis call that swallowed the cancellation.
        await asyncio.wait(background, timeout=2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(queue.aclose(), timeout=2.0)


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503, 504)
}

app = FastAPI(
    title="hueyserve",
    summary="Serve scikit-learn models on CPUs through a Huey task queue on Redis.",
    version="0.1.0",
    lifespan=lifespan,
    responses=ERRORS,
)


def openapi_with_v2_bodies() -> dict[str, Any]:
    """FastAPI's schema, plus the bodies of the routes that read theirs raw (v2 infer, for
    binary tensors; v1 predict, to answer repeated bodies before parsing them)."""
    if app.openapi_schema is None:
        schema = default_openapi()
        _, defs = models_json_schema(
            [(v2_protocol.InferenceRequest, "validation"), (PredictRequest, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        schema["components"]["schemas"].update(defs["$defs"])
    return app.openapi_schema or {}


default_openapi = app.openapi
app.openapi = openapi_with_v2_bodies  # type: ignore[method-assign]
# Outermost last: the timer sees every answer; the guard refuses before the cache reads a body.
app.add_middleware(CachedAnswers)
app.add_middleware(
    RequestGuard,
    predict_keys=settings.keys("api"),
    admin_keys=settings.keys("admin"),
    max_body_bytes=settings.max_body_bytes,
)
app.add_middleware(metrics.RequestTimer)


async def get_service(request: Request) -> PredictService:  # async: no threadpool hop
    service: PredictService = request.app.state.service
    return service


Service = Annotated[PredictService, Depends(get_service)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        max_length=200,
        description="Submitting again with the same key returns the first submission's job "
        "instead of a second job (keys live as long as job records).",
    ),
]


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


# --- KServe v1: models and predict -------------------------------------------------------------


@app.get("/v1/models", response_model=ModelList, summary="KServe v1: the models served")
async def list_models(service: Service) -> ModelList:
    return ModelList(models=sorted(service.catalog.models))


@app.get(
    "/v1/models/{name:model}",
    response_model=ModelStatus,
    responses={503: {"model": ModelStatus, "description": "Known, but no worker serves it."}},
    summary="KServe v1: is the model ready (503 when not)",
)
async def model_status(name: str, service: Service) -> JSONResponse:
    entry = service.catalog.entry(name)
    ready = await service.model_ready()
    status = ModelStatus(
        name=name, ready=ready, active_version=entry.active, versions=entry.version_list()
    )
    return JSONResponse(status.model_dump(), status_code=200 if ready else 503)


PREDICT_BODY = {
    "required": True,
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}}},
}


@app.post(
    "/v1/models/{name:model}:predict",
    response_model=PredictResponse,
    responses={202: {"model": JobAccepted, "description": "With `Prefer: respond-async`."}},
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="Predict with the active version (blocking), or a job with `Prefer: respond-async`",
)
async def predict(
    name: str,
    request: Request,
    service: Service,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    model = service.catalog.get(name)
    return await predict_v1(model, request, service, prefer, idempotency_key)


@app.post(
    "/v1/models/{name:model}/versions/{version}:predict",
    response_model=PredictResponse,
    responses={202: {"model": JobAccepted, "description": "With `Prefer: respond-async`."}},
    openapi_extra={"requestBody": PREDICT_BODY},
    summary="Predict with one version, active or not",
)
async def predict_version(
    name: str,
    version: str,
    request: Request,
    service: Service,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    model = service.catalog.get(name, version)
    return await predict_v1(model, request, service, prefer, idempotency_key)


async def predict_v1(
    model: ModelVersion,
    request: Request,
    service: PredictService,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    """The body is read raw and parsed by pydantic-core straight from the bytes; the answer is
    kept under those bytes, so hueyserve.hot_path answers them again before any parsing."""
    raw = await request.body()
    body = parse_json_body(PredictRequest, raw, request.headers.get("content-type"))
    features = service.rows(model, body.instances)
    if wants_async(prefer):
        accepted = await service.submit(
            model, features, priority=body.priority, deadline_s=body.timeout,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return accepted_response(accepted)
    answer = await service.infer(model, features, priority=body.priority, timeout_s=body.timeout)
    # Rendered with orjson straight away: the response model documents the body, and
    # validating our own output once more per request would only cost time.
    content = orjson.dumps(
        {
            "predictions": v1_predictions(model, answer.outputs),
            "model_name": model.name,
            "model_version": model.version,
        }
    )
    service.keep_answer(model, raw, content)
    return Response(content, media_type="application/json", headers=answer_headers(answer))


# --- Open Inference Protocol v2 ---------------------------------------------------------------


@app.get("/v2", response_model=v2_protocol.ServerMetadata, summary="v2: server metadata")
async def server_metadata() -> v2_protocol.ServerMetadata:
    return v2_protocol.ServerMetadata(
        name=app.title, version=app.version, extensions=v2_protocol.EXTENSIONS
    )


# Each v2 route comes twice, for the active version and for `/versions/{version}`; the
# second passes its version to the first.


@app.get(
    "/v2/models/{name:model}", response_model=v2_protocol.ModelMetadata, summary="v2: metadata"
)
async def model_metadata(name: str, service: Service) -> v2_protocol.ModelMetadata:
    return describe(service, name, None)


@app.get(
    "/v2/models/{name:model}/versions/{version}",
    response_model=v2_protocol.ModelMetadata,
    summary="v2: metadata of one version",
)
async def version_metadata(name: str, version: str, service: Service) -> v2_protocol.ModelMetadata:
    return describe(service, name, version)


def describe(service: PredictService, name: str, version: str | None) -> v2_protocol.ModelMetadata:
    entry = service.catalog.entry(name)
    return v2_protocol.model_metadata(entry.get(version), entry.version_list())


@app.get("/v2/models/{name:model}/ready", summary="v2: model readiness (503 when not ready)")
async def model_ready(name: str, service: Service) -> JSONResponse:
    return await readiness(service, name, None)


@app.get("/v2/models/{name:model}/versions/{version}/ready", summary="v2: version readiness")
async def version_ready(name: str, version: str, service: Service) -> JSONResponse:
    return await readiness(service, name, version)


async def readiness(service: PredictService, name: str, version: str | None) -> JSONResponse:
    service.catalog.get(name, version)  # 404 for an unknown model or version
    ready = await service.model_ready()
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": {
            "schema": {"type": "string", "format": "binary"},
            "description": f"JSON, then binary tensors; JSON length in {v2_protocol.BINARY_HEADER}",
        },
    },
}


@app.post(
    "/v2/models/{name:model}/infer",
    response_model=v2_protocol.InferenceResponse,
    openapi_extra={"requestBody": INFER_BODY},
    summary="v2: infer with the active version (JSON or binary tensors)",
)
async def infer(
    name: str,
    request: Request,
    service: Service,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await infer_v2(service, name, None, request, prefer, idempotency_key)


@app.post(
    "/v2/models/{name:model}/versions/{version}/infer",
    response_model=v2_protocol.InferenceResponse,
    openapi_extra={"requestBody": INFER_BODY},
    summary="v2: infer with one version",
)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    service: Service,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: IdempotencyKey = None,
) -> Response:
    return await infer_v2(service, name, version, request, prefer, idempotency_key)


async def infer_v2(
    service: PredictService,
    name: str,
    version: str | None,
    request: Request,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    """The body is read raw: JSON, or JSON then binary tensors (Triton's extension)."""
    body = await request.body()
    infer_request, binary = v2_protocol.parse_request(
        body, request.headers.get(v2_protocol.BINARY_HEADER)
    )
    model = service.catalog.get(name, version)
    max_rows = service.settings.max_instances
    tensor = v2_protocol.decode_features(infer_request, binary, model, max_rows=max_rows)
    features = service.check(model, tensor)
    selected = v2_protocol.select_outputs(infer_request, model)
    plan = v2_protocol.schedule(infer_request.parameters)
    if wants_async(prefer):
        accepted = await service.submit(
            model, features, priority=plan.priority, deadline_s=plan.timeout_s, protocol="v2",
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return accepted_response(accepted)
    answer = await service.infer(model, features, priority=plan.priority, timeout_s=plan.timeout_s)
    answer_v2 = v2_protocol.v2_response(
        model, answer.outputs, request_id=infer_request.id, selected=selected
    )
    content, header_length = v2_protocol.encode(answer_v2, selected)
    headers = answer_headers(answer)
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[v2_protocol.BINARY_HEADER] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


# --- jobs -------------------------------------------------------------------------------------


@app.post("/v1/jobs", status_code=202, response_model=JobAccepted, summary="Submit an async job")
async def submit_job(
    body: JobSubmit, service: Service, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    model = service.catalog.get(body.model, body.version)
    features = service.rows(model, body.instances)
    accepted = await service.submit(
        model, features, priority=body.priority, deadline_s=body.timeout,
        idempotency_key=idempotency_key,
    )  # fmt: skip
    return accepted_response(accepted)


@app.get("/v1/jobs/{job_id}", response_model=JobPublic, summary="Status and result of a job")
async def get_job(job_id: str, service: Service) -> JobPublic:
    return await service.job(job_id)


@app.delete(
    "/v1/jobs/{job_id}",
    response_model=JobPublic,
    summary="Cancel a queued job (409 once it runs or has ended)",
)
async def cancel_job(job_id: str, service: Service) -> JobPublic:
    return await service.cancel(job_id)


@app.post(
    "/v1/queue/purge",
    summary="Admin: cancel every queued job (running ones finish)",
    response_model=dict[str, int],
)
async def purge_queue(service: Service) -> dict[str, int]:
    return await service.purge()


# --- model life cycle -------------------------------------------------------------------------


@app.post(
    "/v1/models/{name:model}/train",
    status_code=202,
    response_model=JobAccepted,
    summary="Train a new version through the queue (low priority); the job names the version",
)
async def train(
    name: str,
    service: Service,
    body: TrainRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    return accepted_response(await service.train(name, body or TrainRequest(), idempotency_key))


@app.post(
    "/v1/models/{name:model}/reload",
    response_model=ReloadResult,
    summary="Make a version active now (pinned), or the newest (unpinned) with no version",
)
async def reload(name: str, service: Service, body: ReloadRequest | None = None) -> ReloadResult:
    result = await service.reload(name, (body or ReloadRequest()).version)
    return ReloadResult(**result)


def wants_async(prefer: str | None) -> bool:
    return bool(prefer) and "respond-async" in str(prefer).lower()


def answer_headers(answer: Prediction) -> dict[str, str]:
    headers = {"X-Cache": answer.source}
    headers["X-Model-Version"] = answer.model.version
    if answer.job_id:
        headers["X-Job-Id"] = answer.job_id
    return headers


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


@app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus(service: Service) -> Response:
    with contextlib.suppress(ServiceError):  # Redis down: the rest still reports
        await service.update_queue_depth()
    content, media_type = metrics.render()
    return Response(content, media_type=media_type)


@app.get("/health", summary="Details: Redis latency, queue depth, workers, models, cache")
async def health(service: Service) -> JSONResponse:
    reasons = await service.readiness()
    details = {"ready": not reasons, "reasons": reasons, **await service.details()}
    return JSONResponse(details, status_code=200 if not reasons else 503)
