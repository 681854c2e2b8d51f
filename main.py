"""The HTTP API. Run: `uvicorn main:app --log-config config/logger.config`.

Routes only: KServe v1, the Open Inference Protocol v2, jobs, the model life cycle and health.
Paths and who may call them live in hueyserve.api.paths, bodies in hueyserve.api.schemas and
hueyserve.api.v2, the work in the services of hueyserve.api (inference, jobs, health), and the
app's lifespan and middleware in hueyserve.api.app. Every domain error becomes its HTTP answer
in the one handler below.

The module is over 300 lines on purpose: it is the whole HTTP surface in one place, each route
a decorator that documents it and a few lines that call a service.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Annotated, Any

import orjson
from fastapi import Depends, Header, Path, Request, Response, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

import core
from hueyserve import metrics
from hueyserve.api import dashboard, paths, sessions, sockets, v2
from hueyserve.api.app import create_app
from hueyserve.api.guard import is_admin, key_of, keys_on, scoped
from hueyserve.api.imports import read_import
from hueyserve.api.inference import Prediction
from hueyserve.api.inputs import check_features
from hueyserve.api.paths import Access
from hueyserve.api.schemas import (
    DeleteResult,
    ImportResult,
    JobAccepted,
    JobPublic,
    JobSubmit,
    ModelList,
    ModelStatus,
    PredictRequest,
    PredictResponse,
    ReloadRequest,
    ReloadResult,
    TextPredictRequest,
    TrainRequest,
)
from hueyserve.api.services import Services, Tasks
from hueyserve.api.v1 import (
    decode_instances,
    decode_texts,
    encode_predictions,
    rows_of,
    text_input,
)
from hueyserve.api.validation import parse_json_body, validation_failure
from hueyserve.errors import RedisUnavailable, ResultUnavailable, ServiceError
from hueyserve.models import ModelVersion
from hueyserve.settings import settings

logger = logging.getLogger(__name__)

app = create_app(
    settings,
    core.huey,
    Tasks(
        predict=core.predict,
        train=core.train,
        reload=core.reload_model,
        import_=core.import_model,
        delete=core.delete_model,
    ),
)


async def get_services(request: Request) -> Services:  # async: no threadpool hop
    services: Services = request.app.state.services
    return services


Api = Annotated[Services, Depends(get_services)]
Prefer = Annotated[str | None, Header()]
JobId = Annotated[str, Path(max_length=200, description="The id a submission answered.")]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        max_length=64,
        description="Resume after this event (EventSource sends it when it reconnects).",
    ),
]
#: The event streams' 200 (404/401 come before the stream starts). They return their own
#: response: FastAPI's `response_class=EventSourceResponse` would stream a generator, and an
#: error raised in it could only end a stream already answered 200.
STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "The events (server-sent)."},
}


# async: a plain `def` dependency would run in a thread pool, a hop per request on the hot path.
async def idempotency(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="Submitting again with the same key returns the first submission's "
            "job (or, for a blocking call, its answer) instead of a second job; keys live as "
            "long as job records, and each API key has its own.",
        ),
    ] = None,
) -> str | None:
    return scoped(request.state, idempotency_key)


IdempotencyKey = Annotated[str | None, Depends(idempotency)]


# --- errors -------------------------------------------------------------------------------


@app.exception_handler(ServiceError)
async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
    # An outage is logged once, by the catalog and the result listener, not once per request.
    if exc.status_code >= 500 and not isinstance(exc, (RedisUnavailable, ResultUnavailable)):
        logger.warning("%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc)
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers())


@app.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    failure = validation_failure(exc.errors(), request.headers.get("content-type"))
    return await service_error(request, failure)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Routing errors (404 no such route, 405 wrong method) in our error format. A 405's
    `Allow` names the methods of every route on the path (Starlette names only the first's)."""
    message = f"{exc.detail}: {request.method} {request.url.path}; see /docs for the routes"
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(sorted(allowed_methods(request.scope)))
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=headers)


def allowed_methods(scope: Scope) -> set[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] is not Match.NONE:
            methods |= route.methods or set()
    return methods


# --- KServe v1: models and predict -------------------------------------------------------------


@app.get(paths.V1_MODELS, response_model=ModelList, summary="KServe v1: the models served")
async def list_models(api: Api) -> ModelList:
    return ModelList(models=sorted(api.catalog.models))


@app.get(
    paths.V1_MODEL,
    response_model=ModelStatus,
    responses={503: {"model": ModelStatus, "description": "Known, but no worker serves it."}},
    summary="KServe v1: is the model ready (503 when not)",
)
async def model_status(name: str, api: Api) -> JSONResponse:
    entry = api.catalog.entry(name)
    ready = await api.health.model_ready()
    status = ModelStatus(
        name=name, ready=ready, active_version=entry.active, versions=entry.version_list()
    )
    return JSONResponse(status.model_dump(), status_code=200 if ready else 503)


PREDICT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {  # rows of numbers, or one string per row for a text model
                "anyOf": [
                    {"$ref": "#/components/schemas/PredictRequest"},
                    {"$ref": "#/components/schemas/TextPredictRequest"},
                ]
            }
        }
    },
}
#: What both v1 predict routes declare (the body is read raw, so it is documented here).
PREDICT_ROUTE: dict[str, Any] = {
    "response_model": PredictResponse,
    "responses": {202: {"model": JobAccepted, "description": "With `Prefer: respond-async`."}},
    "openapi_extra": {"requestBody": PREDICT_BODY},
}


@app.post(
    paths.V1_PREDICT,
    **PREDICT_ROUTE,
    summary="Predict with the active version (blocking), or a job with `Prefer: respond-async`",
)
async def predict(
    name: str,
    request: Request,
    api: Api,
    idempotency_key: IdempotencyKey,
    prefer: Prefer = None,
) -> Response:
    model = api.catalog.get(name)
    return await predict_v1(model, request, api, prefer, idempotency_key)


@app.post(
    paths.V1_PREDICT_VERSION,
    **PREDICT_ROUTE,
    summary="Predict with one version, active or not",
)
async def predict_version(
    name: str,
    version: str,
    request: Request,
    api: Api,
    idempotency_key: IdempotencyKey,
    prefer: Prefer = None,
) -> Response:
    model = api.catalog.get(name, version)
    return await predict_v1(model, request, api, prefer, idempotency_key)


async def predict_v1(
    model: ModelVersion,
    request: Request,
    api: Services,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    """The body is read raw and parsed by pydantic-core straight from the bytes; the answer is
    kept under those bytes, so hueyserve.api.answers answers them again before any parsing."""
    raw = await request.body()
    content_type = request.headers.get("content-type")
    body: PredictRequest | TextPredictRequest
    if model.takes_text:
        body = parse_json_body(TextPredictRequest, raw, content_type, takes=text_input(model))
        features = decode_texts(model, body.instances, max_rows=settings.max_instances)
    else:
        body = parse_json_body(PredictRequest, raw, content_type)
        features = decode_instances(model, body.instances, max_rows=settings.max_instances)
    if wants_async(prefer):
        accepted = await api.jobs.submit(
            model, features, priority=body.priority, deadline_s=body.timeout,
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return accepted_response(accepted)
    answer = await api.inference.infer(
        model, features, priority=body.priority, timeout_s=body.timeout,
        client_key=idempotency_key,
    )  # fmt: skip
    # Rendered with orjson straight away: the response model documents the body, and
    # validating our own output once more per request would only cost time.
    content = orjson.dumps(
        {
            "predictions": encode_predictions(model, answer.outputs),
            "model_name": model.name,
            "model_version": model.version,
        }
    )
    api.answers.keep(model, raw, content)
    return Response(content, media_type="application/json", headers=answer_headers(answer))


# --- Open Inference Protocol v2 ---------------------------------------------------------------


@app.get(paths.V2_SERVER, response_model=v2.ServerMetadata, summary="v2: server metadata")
async def server_metadata() -> v2.ServerMetadata:
    return v2.ServerMetadata(name=app.title, version=app.version, extensions=v2.EXTENSIONS)


# Each v2 route comes twice, for the active version and for `/versions/{version}`; the
# second passes its version to the first.


@app.get(paths.V2_MODEL, response_model=v2.ModelMetadata, summary="v2: metadata")
async def model_metadata(name: str, api: Api) -> v2.ModelMetadata:
    return describe(api, name, None)


@app.get(
    paths.V2_VERSION,
    response_model=v2.ModelMetadata,
    summary="v2: metadata of one version",
)
async def version_metadata(name: str, version: str, api: Api) -> v2.ModelMetadata:
    return describe(api, name, version)


def describe(api: Services, name: str, version: str | None) -> v2.ModelMetadata:
    entry = api.catalog.entry(name)
    return v2.model_metadata(entry.get(version), entry.version_list())


@app.get(paths.V2_MODEL_READY, summary="v2: model readiness (503 when not ready)")
async def model_ready(name: str, api: Api) -> JSONResponse:
    return await readiness(api, name, None)


@app.get(paths.V2_VERSION_READY, summary="v2: version readiness")
async def version_ready(name: str, version: str, api: Api) -> JSONResponse:
    return await readiness(api, name, version)


async def readiness(api: Services, name: str, version: str | None) -> JSONResponse:
    api.catalog.get(name, version)  # 404 for an unknown model or version
    ready = await api.health.model_ready()
    return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)


INFER_BODY = {
    "required": True,
    # Binary tensors (Triton's extension) are not listed as a content type: OpenAPI cannot say
    # that such a body starts with JSON whose length a header gives, and any bytes are not valid.
    "description": "JSON. With Triton's binary extension: `application/octet-stream`, the JSON "
    f"request (its length in `{v2.BINARY_HEADER}`) followed by the raw tensor bytes.",
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
    },
}


@app.post(
    paths.V2_INFER,
    response_model=v2.InferenceResponse,
    openapi_extra={"requestBody": INFER_BODY},
    summary="v2: infer with the active version (JSON or binary tensors)",
)
async def infer(
    name: str,
    request: Request,
    api: Api,
    idempotency_key: IdempotencyKey,
    prefer: Prefer = None,
) -> Response:
    return await infer_v2(api, name, None, request, prefer, idempotency_key)


@app.post(
    paths.V2_VERSION_INFER,
    response_model=v2.InferenceResponse,
    openapi_extra={"requestBody": INFER_BODY},
    summary="v2: infer with one version",
)
async def infer_version(
    name: str,
    version: str,
    request: Request,
    api: Api,
    idempotency_key: IdempotencyKey,
    prefer: Prefer = None,
) -> Response:
    return await infer_v2(api, name, version, request, prefer, idempotency_key)


async def infer_v2(
    api: Services,
    name: str,
    version: str | None,
    request: Request,
    prefer: str | None,
    idempotency_key: str | None,
) -> Response:
    """The body is read raw: JSON, or JSON then binary tensors (Triton's extension)."""
    v2.check_media(request.headers.get("content-type"), request.headers.get("content-encoding"))
    body = await request.body()
    infer_request, binary = v2.parse_request(body, request.headers.get(v2.BINARY_HEADER))
    model = api.catalog.get(name, version)
    max_rows = settings.max_instances
    tensor = v2.decode_features(infer_request, binary, model, max_rows=max_rows)
    features = check_features(model, tensor, max_rows=max_rows)
    selected = v2.select_outputs(infer_request, model)
    plan = v2.schedule(infer_request.parameters)
    if wants_async(prefer):
        accepted = await api.jobs.submit(
            model, features, priority=plan.priority, deadline_s=plan.timeout_s, protocol="v2",
            idempotency_key=idempotency_key,
        )  # fmt: skip
        return accepted_response(accepted)
    answer = await api.inference.infer(
        model, features, priority=plan.priority, timeout_s=plan.timeout_s,
        client_key=idempotency_key, protocol="v2",
    )  # fmt: skip
    answer_v2 = v2.v2_response(
        model, answer.outputs, request_id=infer_request.id, selected=selected
    )
    content, header_length = v2.encode(answer_v2, selected)
    headers = answer_headers(answer)
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[v2.BINARY_HEADER] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


# --- jobs -------------------------------------------------------------------------------------


@app.post(paths.JOBS, status_code=202, response_model=JobAccepted, summary="Submit an async job")
async def submit_job(body: JobSubmit, api: Api, idempotency_key: IdempotencyKey) -> JSONResponse:
    model = api.catalog.get(body.model, body.version)
    features = rows_of(model, body.instances, max_rows=settings.max_instances)
    accepted = await api.jobs.submit(
        model, features, priority=body.priority, deadline_s=body.timeout,
        idempotency_key=idempotency_key,
    )  # fmt: skip
    return accepted_response(accepted)


@app.get(paths.JOB, response_model=JobPublic, summary="Status and result of a job")
async def get_job(job_id: JobId, api: Api) -> JobPublic:
    return await api.jobs.job(job_id)


@app.get(
    paths.JOB_EVENTS,
    summary="A job's events, server-sent, until it ends",
    responses={
        **STREAM_RESPONSES,
        204: {"description": "The job has ended and the client saw its last event: stop."},
    },
)
async def job_events(job_id: JobId, api: Api, last_event_id: LastEventId = None) -> Response:
    """Its state first, then each change (`data` is JSON; `id` is the stream id to resume
    from); the stream ends after the final event, which carries the result."""
    return await api.streams.job(job_id, last_event_id)


@app.get(
    paths.EVENTS,
    summary="The whole deployment's events, server-sent",
    responses=STREAM_RESPONSES,
)
async def deployment_events(api: Api, last_event_id: LastEventId = None) -> Response:
    """Job changes (`event: job`), model promotions (`model`) and workers joining or lost
    (`worker`); `reset` when the id to resume from was trimmed away."""
    return await api.streams.everything(last_event_id)


@app.websocket(paths.JOB_EVENTS)
async def job_events_socket(socket: WebSocket, job_id: str) -> None:
    """The WebSocket twin of the job's server-sent events: the same JSON, with its `id`;
    `?last_event_id=` resumes. The guard checks the key (or session) and the Origin."""
    services: Services = socket.app.state.services
    await socket.accept()
    last_event_id = socket.query_params.get("last_event_id")
    await sockets.job_socket(services.streams, socket, job_id[:200], last_event_id)


@app.delete(
    paths.JOB,
    response_model=JobPublic,
    summary="Cancel a queued job (409 once it runs or has ended)",
)
async def cancel_job(job_id: JobId, api: Api) -> JobPublic:
    return await api.jobs.cancel(job_id)


@app.post(
    paths.PURGE,
    summary="Admin: cancel every queued job (running ones finish)",
    response_model=dict[str, int],
)
async def purge_queue(api: Api) -> dict[str, int]:
    return await api.jobs.purge()


# --- model life cycle -------------------------------------------------------------------------


@app.post(
    paths.V1_TRAIN,
    status_code=202,
    response_model=JobAccepted,
    summary="Train a new version through the queue (low priority); the job names the version",
)
async def train(
    name: str,
    api: Api,
    idempotency_key: IdempotencyKey,
    body: TrainRequest | None = None,
) -> JSONResponse:
    return accepted_response(await api.jobs.train(name, body or TrainRequest(), idempotency_key))


@app.post(
    paths.V1_RELOAD,
    response_model=ReloadResult,
    summary="Make a version active now (pinned), or the newest (unpinned) with no version",
)
async def reload(name: str, api: Api, body: ReloadRequest | None = None) -> ReloadResult:
    result = await api.jobs.reload(name, (body or ReloadRequest()).version)
    return ReloadResult(**result)


#: The import route reads its body itself (multipart or JSON), so it is documented here.
IMPORT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "metadata": {"type": "string", "description": "metadata.json (optional)"},
                    "file": {"type": "string", "format": "binary", "description": "an artifact"},
                },
            }
        },
        "application/json": {
            "schema": {"type": "object", "description": "metadata with 'uri' and 'files'"}
        },
    },
}


@app.post(
    paths.V1_VERSIONS,
    status_code=201,
    response_model=ImportResult,
    summary="Import a version trained elsewhere (admin): checked by a worker, then served",
    openapi_extra={"requestBody": IMPORT_BODY},
)
async def import_version(
    name: str, request: Request, api: Api, activate: bool = True
) -> ImportResult:
    metadata, files = await read_import(request)
    result = await api.admin.import_version(name, metadata, files, activate=activate)
    return ImportResult(**result)


@app.delete(
    paths.V1_VERSION,
    response_model=DeleteResult,
    summary="Delete a version that is not active (admin); its artifacts are freed",
)
async def delete_version(name: str, version: str, api: Api) -> DeleteResult:
    return DeleteResult(**await api.admin.delete(name, version))


@app.delete(
    paths.V1_MODEL,
    response_model=DeleteResult,
    summary="Delete a model and every version (admin)",
)
async def delete_model(name: str, api: Api) -> DeleteResult:
    return DeleteResult(**await api.admin.delete(name, None))


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


# --- dashboard and sessions -------------------------------------------------------------------


@app.get(paths.DASHBOARD, include_in_schema=False)
async def dashboard_page() -> Response:
    return Response(dashboard.page(), media_type="text/html; charset=utf-8")


@app.get(paths.STATS, summary="The last minutes: throughput, latency percentiles, rates, workers")
async def stats(api: Api, request: Request) -> JSONResponse:
    return JSONResponse(await dashboard.stats(api, admin=is_admin(request.state)))


@app.get(paths.SESSION, summary="Whether this server has keys, and what the caller may do")
async def session_status(request: Request) -> JSONResponse:
    """Open, so a page can tell before it asks for a key: `access` is what the request's key
    or session cookie gives (null: none; with no keys configured, everything)."""
    access = getattr(request.state, "caller", None)
    return JSONResponse(
        {"keys": keys_on(request.state), "access": access.value if access else None}
    )


@app.post(paths.SESSION, summary="A browser session cookie for the key in the header")
async def start_session(request: Request) -> JSONResponse:
    """For pages: EventSource and WebSocket cannot send the key, so the cookie stands for
    it (reads only) for HUEYSERVE_SESSION_TTL_S. Without keys configured, none is needed."""
    access = getattr(request.state, "caller", None) or Access.ADMIN
    keyed = keys_on(request.state)
    body = {"access": access.value, "keys": keyed, "expires_in": settings.session_ttl_s}
    response = JSONResponse(body)
    key = key_of(dict(request.scope["headers"]))
    if keyed and key:
        salt = (settings.secret_value() or "").encode()  # as the guard's key_salt
        token = sessions.mint(key, access, settings.session_ttl_s, salt)
        response.set_cookie(
            sessions.COOKIE, token, max_age=settings.session_ttl_s, httponly=True,
            samesite="strict", secure=request.url.scheme == "https", path="/",
        )  # fmt: skip
    return response


@app.post(paths.SESSION_END, summary="End the browser session (the cookie expires)")
async def end_session() -> JSONResponse:
    response = JSONResponse({"ended": True})
    response.delete_cookie(sessions.COOKIE, path="/")
    return response


# --- health -------------------------------------------------------------------------------


@app.get(paths.LIVE, summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@app.get(paths.READY, summary="Readiness: Redis, a worker and a model are there")
async def ready(api: Api, request: Request) -> JSONResponse:
    """Open to probes; why it is not ready is told to an admin key only (with keys on)."""
    reasons = await api.health.readiness()
    if not reasons:
        return JSONResponse({"ready": True})
    body = {"ready": False, "reasons": reasons} if is_admin(request.state) else {"ready": False}
    return JSONResponse(body, status_code=503)


@app.get(paths.METRICS, summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus(api: Api) -> Response:
    with contextlib.suppress(ServiceError):  # Redis down: the rest still reports
        await api.health.update_queue_depth()
    content, media_type = metrics.render()
    return Response(content, media_type=media_type)


@app.get(paths.HEALTH, summary="Details: Redis latency, queue depth, workers, models, cache")
async def health(api: Api, request: Request) -> JSONResponse:
    """Open, but only readiness without an admin key (with keys on): workers' hosts, model
    names and Redis errors are for operators."""
    reasons = await api.health.readiness()
    status = 200 if not reasons else 503
    if not is_admin(request.state):
        return JSONResponse({"ready": not reasons}, status_code=status)
    details = {"ready": not reasons, "reasons": reasons, **await api.health.details()}
    return JSONResponse(details, status_code=status)
