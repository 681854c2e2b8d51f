"""Model administration in the API process: import a version trained elsewhere, delete a
version or a model. Both go through a worker (tasks `import_model`, `delete_model` in core.py),
which alone changes the catalog; the API checks what it can first and carries an import's files
to Redis, where every worker host can fetch them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from huey.api import TaskWrapper
from starlette.datastructures import UploadFile
from starlette.requests import Request

from hueyserve.api.catalog import ModelCatalog
from hueyserve.api.jobs import JobService
from hueyserve.api.queue import TaskQueue, redis_errors
from hueyserve.artifacts import (
    ArtifactError,
    ArtifactStore,
    ArtifactTooLarge,
    check_metadata,
)
from hueyserve.errors import (
    BadRequest,
    Conflict,
    InvalidInput,
    PayloadTooLarge,
    PredictionFailed,
    ServiceUnavailable,
    UnsupportedMediaType,
)
from hueyserve.jobs import RELOAD_PRIORITY, JobKind
from hueyserve.settings import Settings

#: Errors a worker raises for a version or a request that cannot be served as sent: the
#: client's to fix (422, 409). Any other failure of an import or delete is ours (503).
REFUSALS = frozenset(
    {"ModelLoadError", "OutputMismatch", "ArtifactError", "ArtifactTooLarge", "CatalogError"}
)
MAX_FILES = 64  #: files in one import (a python runtime model may bring several)
MAX_METADATA_BYTES = 1024 * 1024


async def read_import(request: Request) -> tuple[Any, dict[str, bytes] | None]:
    """An import's metadata and files: multipart/form-data (a `metadata` part, JSON, and
    one part per file, named by its filename), or JSON metadata alone (artifacts at its
    `uri`). Files None: none were sent."""
    media = (request.headers.get("content-type") or "").split(";")[0].strip().lower()
    if media == "application/json":
        return _json(await request.body(), "the body"), None
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            "send the files as multipart/form-data (curl -F metadata=@metadata.json "
            "-F file=@model.onnx), or JSON metadata with a 'uri'; not "
            f"{media or 'a body without a Content-Type'!r}"
        )
    metadata: Any = {}
    files: dict[str, bytes] = {}
    form = await request.form(
        max_files=MAX_FILES, max_fields=MAX_FILES, max_part_size=MAX_METADATA_BYTES
    )
    try:
        for field, value in form.multi_items():
            if field == "metadata":
                raw = await value.read() if isinstance(value, UploadFile) else value.encode()
                metadata = _json(raw, "the metadata part")
            elif isinstance(value, UploadFile):
                if not value.filename:
                    raise BadRequest(f"part {field!r} has no filename: send it as a file")
                name = value.filename.rsplit("/", 1)[-1]
                if name in files:
                    raise BadRequest(f"two files named {name!r}")
                files[name] = await value.read()
            else:
                raise BadRequest(
                    f"unknown form field {field!r}: send 'metadata' and the files (as files)"
                )
    finally:
        await form.close()
    return metadata, files


def _json(raw: bytes, what: str) -> Any:
    try:
        return orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not JSON: {exc}") from None


class ModelAdmin:
    """One per API process: imports and deletes, each waiting for the worker that does it."""

    def __init__(
        self,
        *,
        settings: Settings,
        queue: TaskQueue,
        catalog: ModelCatalog,
        jobs: JobService,
        import_task: TaskWrapper,
        delete_task: TaskWrapper,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.catalog = catalog
        self.jobs = jobs
        self.import_task = import_task
        self.delete_task = delete_task
        self.artifacts = ArtifactStore(
            queue.huey.storage.conn, max_bytes=settings.max_artifact_bytes
        )

    async def import_version(
        self, name: str, metadata: Any, files: dict[str, bytes] | None, *, activate: bool
    ) -> dict[str, Any]:
        """Check an import, carry its files to Redis and have a worker load it, check its
        signature and answer its example; the new version's summary. 422 with the reason
        when it is refused (the active version keeps serving)."""
        try:
            described = check_metadata(metadata, files, max_bytes=self.settings.max_artifact_bytes)
        except ArtifactTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ArtifactError as exc:
            raise InvalidInput(str(exc)) from None
        if files:
            async with redis_errors():  # chunked writes: in a thread, not on the event loop
                await asyncio.to_thread(self._upload, files)
        return await self._run(self.import_task, (name, described, activate), JobKind.IMPORT, name)

    def _upload(self, files: dict[str, bytes]) -> None:
        for data in files.values():  # content-addressed: a file already there is not sent
            self.artifacts.put(data)

    async def delete(self, name: str, version: str | None) -> dict[str, Any]:
        """Delete a version (not the active one) or a whole model; 404 for one the catalog
        lacks, 409 for the active version."""
        entry = self.catalog.entry(name)
        if version is not None:
            entry.get(version)
        return await self._run(self.delete_task, (name, version), JobKind.DELETE, name)

    async def _run(
        self, task: TaskWrapper, args: tuple[Any, ...], kind: JobKind, name: str
    ) -> dict[str, Any]:
        job_id = await self.jobs.enqueue(task, args, kind, name, RELOAD_PRIORITY, wait=True)
        try:
            result: dict[str, Any] = await self.queue.wait(job_id, self.settings.import_timeout_s)
        except PredictionFailed as exc:
            record, _ = await self.queue.job(job_id)  # its error reads better than Huey's repr
            reason = record.get("error") or exc.message
            if reason.partition(":")[0] not in REFUSALS:  # our fault (a lock, Redis): retry
                raise ServiceUnavailable(f"the {kind.value} failed: {reason}; try again") from None
            if kind is JobKind.DELETE:
                raise Conflict(reason) from None
            raise InvalidInput(
                f"version refused, the active version keeps serving: {reason}"
            ) from None
        async with redis_errors():  # this process answers with the change from now on
            await self.catalog.resync()
        return {**result, "job_id": job_id}
