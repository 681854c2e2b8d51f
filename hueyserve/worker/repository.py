"""The deployment's models as a worker host sees them. The catalog in Redis is the truth:
which models and versions exist, each version's metadata (runtime, signature, SHA-256 of every
file) and the active one; version numbers are allocated there, once for the whole deployment.
Artifacts come from Redis (hueyserve.artifacts.ArtifactStore) or from the version's `uri`
(fsspec) into this host's folder (hueyserve.worker.store), checked against their SHA-256
before anything loads them.

Every change to the catalog happens here, under the models lock: adding a version (an import,
a training, a demo, a folder dropped into a host's store), promoting one, deleting.
A version joins the catalog only once it loaded here, its signature checked and a prediction
on its example input answered (`check`): the active one keeps serving otherwise.

The module is over 300 lines on purpose: it is every change to the catalog, each under the
same lock, and what a host's folder adds to it; split, the invariants would span files.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import fsspec
import redis

from hueyserve import wire
from hueyserve.artifacts import (
    METADATA_FILE,
    ArtifactError,
    ArtifactStore,
    check_file_name,
    file_sha256,
    infer_runtime,
    refuse_pickle,
    sha256_of,
)
from hueyserve.models import ModelEntry, example_rows
from hueyserve.training import DEMOS
from hueyserve.worker.fitting import train
from hueyserve.worker.publishing import entries, publish, withdraw
from hueyserve.worker.registry import LoadedModel
from hueyserve.worker.runtimes import load_runtime
from hueyserve.worker.runtimes.base import ModelLoadError, Signature
from hueyserve.worker.store import ModelStore, write_estimator, write_metadata

logger = logging.getLogger(__name__)

MAX_CLAIMED_VERSION = 2**53  #: Redis counts in doubles: higher numbers are not exact
SETTLE_S = 2.0  #: a dropped folder is imported once its files are this old
FORGET_AFTER_S = 600.0  #: a deleted version's local copy goes once this old


class CatalogError(ValueError):
    """A catalog change that cannot be made as asked; the message says why."""


class ModelRepository:
    """One worker process's access to the catalog, the artifacts and its host's folder."""

    def __init__(
        self,
        conn: redis.Redis,
        store: ModelStore,
        artifacts: ArtifactStore,
        options: Mapping[str, Any],
    ) -> None:
        self.conn = conn
        self.store = store
        self.artifacts = artifacts
        self.options = dict(options)
        self._allocate = conn.register_script(wire.ALLOCATE_VERSION_SCRIPT)
        self._told: set[tuple[str, str, int, int]] = set()  # folders not imported, said once
        self._syncing = threading.Lock()

    # --- loading ------------------------------------------------------------------------------

    def load(self, name: str, version: str) -> LoadedModel:
        """`name` `version` as the catalog describes it, from this host's checked copy."""
        entry = entries(self.conn).get(name)
        metadata = entry.versions.get(version) if entry else None
        if metadata is None:
            raise ModelLoadError(f"the catalog has no version {version!r} of model {name!r}")
        return self.open(name, version, self.fetch(name, version, metadata), metadata)

    def open(
        self, name: str, version: str, folder: Path, metadata: Mapping[str, Any]
    ) -> LoadedModel:
        runtime, signature = load_runtime(folder, metadata, self.options)
        return LoadedModel(name, version, runtime, signature, metadata)

    def fetch(self, name: str, version: str, metadata: Mapping[str, Any]) -> Path:
        """This host's copy of a version, fetched (from Redis or its URI) unless one with the
        catalog's SHA-256 for every file is there already; a local copy that differs is moved
        aside (hueyserve.worker.store.REPLACED_DIR), never loaded."""
        folder = self.store.folder(name, version)
        files: dict[str, Any] = dict(metadata.get("files") or {})
        if not files:  # a version from before the catalog held files (0.2): local only
            return folder
        for file_name in files:
            check_file_name(file_name)  # read from Redis: never a path out of the folder
        if folder.is_dir() and _matches(folder, files):
            return folder
        with self.store.staging() as staging:
            for file_name, described in files.items():
                data = self._read(metadata, file_name, str(described["sha256"]))
                (staging / file_name).write_bytes(data)
            write_metadata(staging, {**metadata, "name": name, "version": version})
            with self.store.lock():  # one process of this host checks and installs at a time
                if folder.is_dir() and _matches(folder, files):
                    return folder  # another process of this host fetched it meanwhile
                if folder.exists():
                    logger.warning(
                        "%s: files differ from the catalog's %s version %s; moved aside, "
                        "fetching the catalog's", folder, name, version,
                    )  # fmt: skip
                self.store.install(name, version, staging)
        return folder

    def _read(self, metadata: Mapping[str, Any], file_name: str, digest: str) -> bytes:
        uri = metadata.get("uri")
        if uri:
            location = f"{str(uri).rstrip('/')}/{file_name}"
            try:
                with fsspec.open(location, "rb") as handle:
                    data: bytes = handle.read()
            except (OSError, ImportError, ValueError) as exc:
                raise ArtifactError(f"cannot read {location}: {exc}") from exc
        else:
            data = self.artifacts.get(digest)
        if sha256_of(data) != digest:
            raise ArtifactError(
                f"{file_name}: its SHA-256 is not the {digest} the catalog has; the file was "
                "changed after its import: import it again"
            )
        return data

    def import_version(
        self, name: str, metadata: Mapping[str, Any], *, activate: bool = True
    ) -> tuple[ModelEntry, LoadedModel]:
        """An import through the API: its files (uploaded to Redis, or at its `uri`) fetched
        and checked against their SHA-256, then `add`."""
        with self.store.staging() as staging:
            for file_name, described in dict(metadata.get("files") or {}).items():
                check_file_name(file_name)  # read from Redis: never a path out of the folder
                data = self._read(metadata, file_name, str(described.get("sha256")))
                (staging / file_name).write_bytes(data)
            return self.add(name, staging, metadata, activate=activate)

    # --- checking -----------------------------------------------------------------------------

    def check(
        self, name: str, folder: Path, metadata: Mapping[str, Any]
    ) -> tuple[LoadedModel, dict[str, Any]]:
        """Load a candidate version from `folder`, check its signature against metadata's and
        answer its example input (`example`, else zeros): the loaded model and its complete
        metadata (runtime, signature, example, files). ModelLoadError or ArtifactError why not."""
        described = describe_folder(folder, metadata)
        model = self.open(name, "candidate", folder, described)
        example = described.get("example")
        if example is None:
            example = default_example(model.signature)
        try:
            outputs = model.answer(example_rows(example, model.signature.inputs[0].datatype))
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"the smoke prediction on the example input failed: {type(exc).__name__}: {exc}"
            ) from exc
        missing = [t.name for t in model.signature.outputs if t.name not in outputs]
        if missing:
            raise ModelLoadError(
                f"the smoke prediction gave no {', '.join(missing)}, which the signature lists"
            )
        return model, {**described, **model.signature.to_json(), "example": example}

    # --- changing (under the models lock) -----------------------------------------------------

    def add(
        self,
        name: str,
        folder: Path,
        metadata: Mapping[str, Any],
        *,
        activate: bool = True,
        version: str | None = None,
        report: Callable[[str], object] | None = None,
    ) -> tuple[ModelEntry, LoadedModel]:
        """Check a version in `folder`, then give it the next number (or claim `version`, for
        a folder dropped into this host's store), publish its artifacts and add it to the
        catalog; active when `activate`, unless an operator pinned another. `report` hears
        of the stages `loaded` (and checked) and `published`."""
        model, full = self.check(name, folder, metadata)
        if report is not None:
            report("loaded")
        through_redis = not full.get("uri")
        if through_redis:
            for file_name in full["files"]:
                self.artifacts.put((folder / file_name).read_bytes())
        # Numbers come from an atomic script, and the folder is copied, outside the lock: it
        # is held only to read, change and publish the entry (a lapsed lock would let another
        # change be overwritten).
        number = self._allocate_version(name, version)
        full = {**full, "name": name, "version": number}
        if folder == self.store.folder(name, number):
            write_metadata(folder, full)  # a dropped folder: now with its SHA-256s
        else:
            with self.store.staging() as staging:
                shutil.copytree(folder, staging, dirs_exist_ok=True)
                write_metadata(staging, full)
                self.store.install(name, number, staging)
        with self.locked():
            if through_redis:  # a delete meanwhile may have collected a file it shares
                for file_name, described in full["files"].items():
                    if not self.conn.exists(wire.artifact_key(described["sha256"])):
                        self.artifacts.put((folder / file_name).read_bytes())
                self.artifacts.keep([str(f["sha256"]) for f in full["files"].values()])
            old = entries(self.conn).get(name)
            versions = {**(old.versions if old else {}), number: full}
            pinned = old.pinned if old else False
            active = number if old is None or (activate and not pinned) else old.active
            entry = ModelEntry(name, active, versions, pinned=pinned)
            publish(self.conn, entry)
        if report is not None:
            report("published")
        logger.info("model %s: version %s added%s", name, number,
                    " and active" if active == number else "")  # fmt: skip
        loaded = LoadedModel(name, number, model.runtime, model.signature, full)
        return entry, loaded

    def _allocate_version(self, name: str, version: str | None) -> str:
        if version is not None and int(version) >= MAX_CLAIMED_VERSION:
            raise CatalogError(f"version {version} of {name} is too high to claim")
        number = int(self._allocate(keys=[wire.VERSIONS_KEY], args=[name, version or ""]))
        if number == 0:
            raise CatalogError(
                f"version {version} of {name} was allocated in this deployment already; copy "
                "the folder to a number above every version it ever had, or import it"
            )
        return str(number)

    def delete(self, name: str, version: str | None = None) -> ModelEntry | None:
        """Delete a version (not the active one) or the whole model, and free the artifacts no
        other version uses; the entry after (None: the model is gone). Numbers are never
        given out again."""
        with self.locked():
            old = entries(self.conn).get(name)
            if old is None:
                raise CatalogError(f"no model {name!r} in the catalog")
            entry: ModelEntry | None = None
            if version is None:
                withdraw(self.conn, name)
            else:
                if version not in old.versions:
                    raise CatalogError(f"model {name!r} has no version {version!r}")
                if version == old.active:
                    raise CatalogError(
                        f"version {version} of {name} is active: make another one active first "
                        "(POST /v1/models/{name}/reload), or delete the whole model"
                    )
                kept = {v: m for v, m in old.versions.items() if v != version}
                entry = ModelEntry(name, old.active, kept, pinned=old.pinned)
                publish(self.conn, entry)
            freed = self.artifacts.collect(self.used_artifacts())
        for gone in [version] if version else list(old.versions):
            self.store.remove(name, gone)
        logger.info("model %s: %s deleted; %d artifacts freed", name,
                    f"version {version}" if version else "every version", freed)  # fmt: skip
        return entry

    def used_artifacts(self) -> set[str]:
        return {
            str(f["sha256"])
            for entry in entries(self.conn).values()
            for metadata in entry.versions.values()
            if not metadata.get("uri")
            for f in (metadata.get("files") or {}).values()
        }

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        with self.conn.lock(wire.MODELS_LOCK_KEY, timeout=120, blocking_timeout=60):
            yield

    # --- this host's folder -------------------------------------------------------------------

    def sync_local(
        self,
        settle_s: float = SETTLE_S,
        *,
        wait: bool = False,
        current: dict[str, ModelEntry] | None = None,
    ) -> dict[str, str]:
        """Import versions found in this host's folder that the deployment never allocated
        (dropped there by hand, or left from before a Redis that lost its data); forget local
        copies of versions deleted elsewhere. {name: version} of those imported. One run at
        a time per process (the heartbeat, the refresh and a reload all call it; with `wait`,
        for the run in progress to end, else skipped). A folder whose files changed in the
        last `settle_s` may still be being copied: it waits for a later run. `current`: the
        catalog as the caller just read it (the heartbeat), so it is not read twice."""
        if not self._syncing.acquire(blocking=wait):
            return {}
        try:
            return self._sync_local(settle_s, entries(self.conn) if current is None else current)
        finally:
            self._syncing.release()

    def _sync_local(self, settle_s: float, current: dict[str, ModelEntry]) -> dict[str, str]:
        imported = {}
        for name in self.store.names():
            entry = current.get(name)
            for version in self.store.versions(name):
                known = entry.versions.get(version) if entry else None
                if known is not None and known.get("files"):
                    continue  # this host's copy of a catalog version
                folder = self.store.folder(name, version)
                state = _state(folder)
                if time.time() - state[0] / 1e9 < settle_s:
                    continue  # still being written (copied in by hand, or installed now)
                if self._allocated(name) >= int(version) and known is None:
                    self._forget_or_tell(name, version, state)
                    continue
                if (name, version, *state) in self._told:
                    continue  # refused already, and unchanged since
                try:
                    self.add(name, folder, self.store.metadata(name, version), version=version)
                except CatalogError:
                    if not self._published(name, version):
                        self._tell(name, version, state, "was claimed by another host first")
                    continue  # else another process of this host imported it meanwhile
                except (ModelLoadError, ArtifactError, OSError) as exc:
                    self._tell(name, version, state, f"cannot be imported: {exc}")
                    continue
                imported[name] = version
        return imported

    def _published(self, name: str, version: str) -> bool:
        entry = entries(self.conn).get(name)
        return entry is not None and version in entry.versions

    def _allocated(self, name: str) -> int:
        return int(self.conn.hget(wire.VERSIONS_KEY, name) or 0)

    def _forget_or_tell(self, name: str, version: str, state: tuple[int, int]) -> None:
        """A local version the catalog lacks but whose number was allocated: a copy hueyserve
        wrote of a version deleted since (removed once it is old enough not to be one being
        added right now), or a folder dropped under a taken number."""
        if self.store.metadata(name, version).get("files"):
            if time.time() - state[0] / 1e9 > FORGET_AFTER_S:
                self.store.remove(name, version)
        else:
            self._tell(name, version, state, "is not served: its number was allocated in "
                       "this deployment already; copy it to a higher version number")  # fmt: skip

    def _tell(self, name: str, version: str, state: tuple[int, int], why: str) -> None:
        """Log once per folder state: a folder changed since is tried, and said, again."""
        if (name, version, *state) not in self._told:
            self._told.add((name, version, *state))
            logger.error("%s: %s", self.store.folder(name, version), why)

    def ensure_demos(self, data_dir: Path) -> None:
        """Train each demo model once per deployment (not per host): a demo deleted on purpose
        is not trained again."""
        if self.conn.scard(wire.DEMOS_KEY) >= len(DEMOS):
            return
        with self.conn.lock(wire.DEMOS_KEY + ":lock", timeout=600, blocking_timeout=600):
            done = {_text(m) for m in self.conn.smembers(wire.DEMOS_KEY)}
            current = entries(self.conn)
            for name, plan in DEMOS.items():
                if name in done:
                    continue
                # One in this host's folder is being imported (or will be, once settled):
                # training another would give the deployment two demos of one name.
                if name not in current and not self.store.versions(name):
                    logger.info("the catalog has no %s: training the demo model", name)
                    estimator, metadata = train(plan, data_dir)
                    with self.store.staging() as staging:
                        write_estimator(staging, estimator, metadata)
                        self.add(name, staging, metadata)
                self.conn.sadd(wire.DEMOS_KEY, name)


def describe_folder(folder: Path, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Metadata with the runtime (inferred from the artifact when absent) and the SHA-256 and
    size of every file in the folder (those metadata lists must match)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != METADATA_FILE)
    declared = metadata.get("files") or {}
    files = {}
    for file_name in names:
        path = folder / file_name
        with open(path, "rb") as handle:
            refuse_pickle(file_name, handle.read(1))
        digest = file_sha256(path)
        expected = declared.get(file_name, {}).get("sha256") if file_name in declared else None
        if expected is not None and expected != digest:
            raise ArtifactError(
                f"{file_name}: its SHA-256 is {digest} but metadata says {expected}"
            )
        files[file_name] = {"sha256": digest, "size": path.stat().st_size}
    missing = set(declared) - set(files)
    if missing:
        raise ArtifactError(f"metadata lists files the folder lacks: {sorted(missing)}")
    runtime = metadata.get("runtime") or infer_runtime(names)
    return {**metadata, "runtime": runtime, "files": files}


def default_example(signature: Signature) -> list[Any]:
    """One row of zeros (or one empty text) when the metadata gives no example."""
    tensor = signature.inputs[0]
    if tensor.datatype == "BYTES":
        return [""]
    width = tensor.shape[1] if len(tensor.shape) == 2 else 1
    if width < 1:
        raise ModelLoadError(
            f"input {tensor.name!r} has no fixed width: give metadata an 'example' input"
        )
    return [[0.0] * width] if len(tensor.shape) == 2 else [0.0]


def _matches(folder: Path, files: Mapping[str, Any]) -> bool:
    return all(
        (folder / name).is_file() and file_sha256(folder / name) == described["sha256"]
        for name, described in files.items()
    )


def _text(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _state(folder: Path) -> tuple[int, int]:
    """When the folder's files last changed, and their total size: a folder still being
    copied changes in one or the other."""
    try:
        stats = [p.stat() for p in folder.iterdir()]
    except OSError:
        return (0, 0)
    return (max((st.st_mtime_ns for st in stats), default=0), sum(st.st_size for st in stats))
