"""The route table: every path the API serves and who may call it, in one place.

main.py declares its routes with these templates; the guard (hueyserve.api.guard) decides
access from `ACCESS` before routing; the answer cache (hueyserve.api.answers) recognises v1
predict requests by their template. A route renamed or moved here moves everywhere.
"""

from __future__ import annotations

import re
from enum import StrEnum

from starlette.convertors import StringConvertor, register_url_convertor

from hueyserve.models import MODEL_NAME


class Access(StrEnum):
    OPEN = "open"  #: probes, scrapers and docs: no key ever
    PREDICT = "predict"  #: a predict key or an admin key (when keys are configured)
    ADMIN = "admin"  #: an admin key: training, reloads, purging the queue


class ModelNameConvertor(StringConvertor):
    """`{name:model}`: a model name never holds ':' or '/', so `GET /v1/models/m:predict` is
    a wrong method on the predict route, not a lookup of a model called 'm:predict'."""

    regex = MODEL_NAME.pattern


class VersionConvertor(StringConvertor):
    """`{version:version}`: no ':' either, so `DELETE …/versions/1` is not a method of the
    `…/versions/1:predict` route."""

    regex = "[^/:]+"


register_url_convertor("model", ModelNameConvertor())
register_url_convertor("version", VersionConvertor())

# KServe v1 and jobs
V1_MODELS = "/v1/models"
V1_MODEL = "/v1/models/{name:model}"
V1_PREDICT = "/v1/models/{name:model}:predict"
V1_PREDICT_VERSION = "/v1/models/{name:model}/versions/{version}:predict"
V1_TRAIN = "/v1/models/{name:model}/train"
V1_RELOAD = "/v1/models/{name:model}/reload"
V1_VERSIONS = "/v1/models/{name:model}/versions"  #: POST: import a version (admin)
V1_VERSION = "/v1/models/{name:model}/versions/{version:version}"  #: DELETE: a version (admin)
JOBS = "/v1/jobs"
JOB = "/v1/jobs/{job_id}"
JOB_EVENTS = "/v1/jobs/{job_id}/events"  #: server-sent events; a WebSocket on the same path
EVENTS = "/v1/events"  #: the whole deployment's events (server-sent)
SESSION = "/v1/session"  #: POST with a key: a browser session cookie (hueyserve.api.sessions)
SESSION_END = "/v1/session/end"  #: POST: the cookie expires (open: ending one harms nobody)
STATS = "/v1/stats"  #: the last minutes' throughput, latency percentiles and rates
DASHBOARD = "/"  #: the live dashboard (a static page; its data comes with a key or session)
PURGE = "/v1/queue/purge"
# Open Inference Protocol v2
V2_SERVER = "/v2"
V2_MODEL = "/v2/models/{name:model}"
V2_VERSION = "/v2/models/{name:model}/versions/{version}"
V2_MODEL_READY = "/v2/models/{name:model}/ready"
V2_VERSION_READY = "/v2/models/{name:model}/versions/{version}/ready"
V2_INFER = "/v2/models/{name:model}/infer"
V2_VERSION_INFER = "/v2/models/{name:model}/versions/{version}/infer"
# Health and tooling
LIVE = "/v2/health/live"
READY = "/v2/health/ready"
HEALTH = "/health"
METRICS = "/metrics"
DOCS_UI = "/docs"
DOCS_OAUTH2 = "/docs/oauth2-redirect"
DOCS_ASSETS = "/docs/assets"  #: Swagger UI's own files (hueyserve.api.docs)
OPENAPI = "/openapi.json"
DOCS = (DOCS_UI, DOCS_OAUTH2, f"{DOCS_ASSETS}/{{file}}", OPENAPI)

OPEN_PATHS = (V2_SERVER, LIVE, READY, HEALTH, METRICS, *DOCS, DASHBOARD, SESSION_END)
ADMIN_PATHS = (V1_TRAIN, V1_RELOAD, PURGE)
#: Admin by method: imports, and deletes of models and versions (GETs need a predict key).
ADMIN_METHODS = {"POST": (V1_VERSIONS,), "DELETE": (V1_MODEL, V1_VERSION)}
#: Open by method: a page asks whether it needs a key (GET) before it has one.
OPEN_METHODS = {"GET": (SESSION,)}
UPLOADS = (V1_VERSIONS,)  #: bodies up to HUEYSERVE_MAX_ARTIFACT_BYTES (POST)


def pattern(template: str) -> re.Pattern[str]:
    """A template as a regex of the request path; each parameter matches one path segment
    (any characters but '/'), so access is decided even for a name the route would refuse."""
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("[^/]+".join(re.escape(part) for part in parts))


def alternatives(templates: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(pattern(t).pattern for t in templates))


OPEN = alternatives(OPEN_PATHS)
ADMIN = alternatives(ADMIN_PATHS)
ADMIN_BY_METHOD = {method: alternatives(t) for method, t in ADMIN_METHODS.items()}
OPEN_BY_METHOD = {method: alternatives(t) for method, t in OPEN_METHODS.items()}
UPLOAD = alternatives(UPLOADS)


def access(path: str, method: str = "GET") -> Access:
    """Who may call `path` (the guard's rule): any path not open or admin needs a key."""
    open_by_method = OPEN_BY_METHOD.get(method)
    if OPEN.fullmatch(path) or (open_by_method is not None and open_by_method.fullmatch(path)):
        return Access.OPEN
    by_method = ADMIN_BY_METHOD.get(method)
    if ADMIN.fullmatch(path) or (by_method is not None and by_method.fullmatch(path)):
        return Access.ADMIN
    return Access.PREDICT


def is_upload(path: str, method: str) -> bool:
    """A model import: its body may be as large as HUEYSERVE_MAX_ARTIFACT_BYTES."""
    return method == "POST" and UPLOAD.fullmatch(path) is not None
