"""Domain errors; each knows its HTTP status, and main.py maps them to responses in one place.

ServiceError (500)
├── BadRequest (400)              malformed JSON
├── NotFound (404)
│   ├── ModelNotFound
│   ├── VersionNotFound
│   └── JobNotFound
├── RequestTimeout (408)          a body that did not arrive in time
├── Conflict (409)                a version that cannot be made active
├── PayloadTooLarge (413)         too many instances
├── UnsupportedMediaType (415)    a body that is not JSON
├── InvalidInput (422)            wrong shape, type or non-finite number
├── ServiceUnavailable (503)      carries Retry-After
│   └── RedisUnavailable          Redis unreachable or too slow
└── JobError                      names the job in the body
    ├── PredictTimeout (504)      sync wait ran out; the job goes on
    ├── ResultUnavailable (503)   Redis failed after the job was accepted
    └── PredictionFailed (500)    the task failed after its retries
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class; `status_code` is the HTTP status, `message` says what to do."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def body(self) -> dict[str, Any]:
        return {"error": self.message}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class ModelNotFound(NotFound):
    def __init__(self, name: str, known: list[str]) -> None:
        choices = ", ".join(sorted(known)) or "none loaded yet"
        super().__init__(f"unknown model {name!r}; available models: {choices}")


class VersionNotFound(NotFound):
    def __init__(self, name: str, version: str, known: list[str]) -> None:
        choices = ", ".join(sorted(known, key=lambda v: int(v) if v.isdigit() else 0))
        super().__init__(f"model {name!r} has no version {version!r}; versions: {choices}")


class JobNotFound(NotFound):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}: the id is wrong or its result has expired")


class Conflict(ServiceError):
    status_code = 409


class RequestTimeout(ServiceError):
    status_code = 408

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # the rest of the body may still come: drop it


class PayloadTooLarge(ServiceError):
    status_code = 413

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}  # else the rest of an endless body keeps the socket


class UnsupportedMediaType(ServiceError):
    status_code = 415


class InvalidInput(ServiceError):
    status_code = 422


class ServiceUnavailable(ServiceError):
    status_code = 503

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class QueueFull(ServiceError):
    """Backpressure: as many tasks as HUEYSERVE_MAX_QUEUE_DEPTH would run before this one.
    429 for a job submission; a sync request turns it into a 503 (`overloaded`)."""

    status_code = 429

    def __init__(self, limit: int, priority: int) -> None:
        super().__init__(
            f"the queue is full: {limit} tasks at priority {priority} or above are waiting "
            "(HUEYSERVE_MAX_QUEUE_DEPTH); retry later"
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}

    def overloaded(self) -> ServiceUnavailable:
        return ServiceUnavailable(self.message)


class RedisUnavailable(ServiceUnavailable):
    def __init__(self, cause: Exception) -> None:
        super().__init__(f"the queue (Redis) is unreachable, try again shortly: {cause}")


class JobError(ServiceError):
    """An error about a job that exists: the body names it so the client can fetch it."""

    def __init__(self, message: str, job_id: str) -> None:
        super().__init__(message)
        self.job_id = job_id

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "job_id": self.job_id}

    def headers(self) -> dict[str, str]:
        return {"X-Job-Id": self.job_id}


class PredictTimeout(JobError):
    status_code = 504

    def __init__(self, job_id: str, timeout_s: float) -> None:
        message = f"no result within {timeout_s:g}s; the job goes on: GET /v1/jobs/{job_id}"
        super().__init__(message, job_id)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Location": f"/v1/jobs/{self.job_id}"}


class ResultUnavailable(JobError):
    status_code = 503

    def __init__(self, job_id: str, cause: str) -> None:
        super().__init__(
            f"the job was accepted but its result cannot be read now ({cause}); "
            f"do not resubmit: GET /v1/jobs/{job_id} once Redis is back",
            job_id,
        )

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "Location": f"/v1/jobs/{self.job_id}", "Retry-After": "1"}


class PredictionFailed(JobError):
    status_code = 500

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(f"prediction failed (job {job_id}): {reason}", job_id)
