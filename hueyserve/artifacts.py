"""The model folder format, shared by the API (imports) and the workers (loading).

A version's folder holds its artifact file(s) and `metadata.json`: the `runtime` that serves
it, its signature (`inputs`, `outputs`, optional `classes`), an `example` input for the smoke
prediction, and `files`: the SHA-256 and size of every other file in the folder.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from pathlib import Path
from typing import Any

import redis

from hueyserve import wire

#: Artifact file names each runtime reads; a folder without a `runtime` field is served by the
#: runtime whose artifact it holds (when exactly one matches).
RUNTIME_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "sklearn": ("model.skops",),
    "onnx": ("model.onnx",),
    "xgboost": ("model.json", "model.ubj"),
    "lightgbm": ("model.txt",),
    "python": ("model.py",),
}

#: A lone file of another name is served by the runtime its suffix names, under that
#: runtime's artifact name (forest.onnx -> model.onnx).
SUFFIX_RUNTIMES = {".skops": "sklearn", ".onnx": "onnx", ".ubj": "xgboost", ".py": "python"}
#: Files refused outright: loading them runs whatever code they name.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".sav", ".dill", ".cloudpickle")
PICKLE_MAGIC = b"\x80"  #: pickle protocol 2 and later start with PROTO (0x80)
METADATA_FILE = "metadata.json"
#: What a file name may be: one plain name, nothing that could leave the folder.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 1024 * 1024  #: one Redis command carries at most this much of an artifact
UPLOAD_TTL_S = 3600  #: an artifact nobody published within this long is dropped by Redis


class ArtifactError(ValueError):
    """A model folder, file or import that cannot be served; the message says what to fix."""


class ArtifactTooLarge(ArtifactError):
    """Above HUEYSERVE_MAX_ARTIFACT_BYTES."""


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file_name(name: str) -> None:
    if not FILE_NAME.fullmatch(name) or name == METADATA_FILE:
        raise ArtifactError(
            f"file name {name!r}: use a plain name of letters, digits, '.', '_' and '-' "
            f"(not {METADATA_FILE}, which is the metadata)"
        )


def refuse_pickle(name: str, head: bytes) -> None:
    """Pickle and joblib files run code when loaded: refused, with how to save instead."""
    if name.lower().endswith(PICKLE_SUFFIXES) or head[:1] == PICKLE_MAGIC:
        raise ArtifactError(
            f"{name} is a pickle (or joblib) file: loading one runs any code it holds, so "
            "hueyserve refuses it. Save the model instead with skops "
            "(skops.io.dump(model, 'model.skops')), as ONNX (skl2onnx.to_onnx), or in the "
            "library's own format (XGBoost: booster.save_model('model.json'); LightGBM: "
            "booster.save_model('model.txt'))"
        )


def infer_runtime(file_names: list[str]) -> str:
    """The runtime of a folder whose metadata names none: the one whose artifact it holds."""
    found = [
        runtime
        for runtime, names in RUNTIME_ARTIFACTS.items()
        if any(name in file_names for name in names)
    ]
    if len(found) != 1:
        known = ", ".join(f"{r} ({'/'.join(n)})" for r, n in RUNTIME_ARTIFACTS.items())
        held = ", ".join(sorted(file_names)) or "no files"
        raise ArtifactError(
            f"cannot tell the runtime from {held}: name it in metadata.json's 'runtime', or "
            f"include exactly one known artifact: {known}"
        )
    return found[0]


def artifact_names(files: dict[str, bytes], runtime: Any) -> dict[str, bytes]:
    """One file not named as its runtime expects (forest.onnx), renamed so that it is; the
    runtime comes from metadata or the file's suffix."""
    for name, data in files.items():  # before any renaming: model.pkl is refused as such
        refuse_pickle(name, data[:1])
    if len(files) != 1 or any(
        name in names for names in RUNTIME_ARTIFACTS.values() for name in files
    ):
        return files
    ((name, data),) = files.items()
    chosen = runtime if runtime in RUNTIME_ARTIFACTS else SUFFIX_RUNTIMES.get(Path(name).suffix)
    if chosen is None:
        return files
    return {RUNTIME_ARTIFACTS[chosen][0]: data}


def check_metadata(
    metadata: Any, files: dict[str, bytes] | None, *, max_bytes: int
) -> dict[str, Any]:
    """An import's metadata, completed and checked against its uploaded `files` (None: the
    artifacts come from metadata's `uri`): the runtime (inferred when absent), and `files`
    with each file's SHA-256 and size. A SHA-256 the metadata gives must match the file."""
    if not isinstance(metadata, dict):
        raise ArtifactError("metadata must be a JSON object")
    declared = metadata.get("files") or {}
    if not isinstance(declared, dict):
        raise ArtifactError('metadata "files" must map each file name to {"sha256": ...}')
    described: dict[str, dict[str, Any]] = {}
    if files is None:
        if not isinstance(metadata.get("uri"), str) or not declared:
            raise ArtifactError(
                "send the artifact files, or give metadata a 'uri' (a folder: s3://, gs://, "
                "file://) and 'files' with the SHA-256 of each file in it"
            )
        for name, entry in declared.items():
            check_file_name(name)
            digest = entry.get("sha256") if isinstance(entry, dict) else None
            if not isinstance(digest, str) or not SHA256.fullmatch(digest):
                raise ArtifactError(f"files[{name!r}].sha256 must be 64 lowercase hex digits")
            described[name] = {"sha256": digest, "size": entry.get("size")}
    else:
        if not files:
            raise ArtifactError("no artifact files: send at least one (e.g. model.onnx)")
        files = artifact_names(files, metadata.get("runtime"))
        total = 0
        for name, data in files.items():
            check_file_name(name)
            refuse_pickle(name, data[:1])
            total += len(data)
            digest = sha256_of(data)
            expected = declared.get(name, {}).get("sha256") if name in declared else None
            if expected is not None and expected != digest:
                raise ArtifactError(
                    f"{name}: its SHA-256 is {digest} but metadata says {expected}; the file "
                    "is not the one described (corrupted or replaced): send it again"
                )
            described[name] = {"sha256": digest, "size": len(data)}
        if total > max_bytes:
            raise ArtifactTooLarge(
                f"the artifacts hold {total} bytes; the limit through Redis is {max_bytes} "
                "(HUEYSERVE_MAX_ARTIFACT_BYTES): raise it, or serve the files from a URI "
                "(metadata 'uri': s3://, gs:// or file:// on a shared mount)"
            )
        missing = set(declared) - set(files)
        if missing:
            raise ArtifactError(f"metadata lists files that were not sent: {sorted(missing)}")
    runtime = metadata.get("runtime") or infer_runtime(list(described))
    if runtime not in RUNTIME_ARTIFACTS:
        raise ArtifactError(
            f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_ARTIFACTS)}"
        )
    return {**metadata, "runtime": runtime, "files": described}


class ArtifactStore:
    """Artifacts in Redis, content-addressed (`wire.artifact_key`), written and read in
    chunks. An upload expires unless a version that uses it is published (`keep`); a
    published one lives until no version uses it (`collect`)."""

    def __init__(self, conn: redis.Redis, *, max_bytes: int) -> None:
        self.conn = conn
        self.max_bytes = max_bytes
        self._store = conn.register_script(wire.STORE_ARTIFACT_SCRIPT)

    def put(self, data: bytes) -> str:
        """Upload `data` (if Redis lacks it) and return its SHA-256."""
        if len(data) > self.max_bytes:
            raise ArtifactTooLarge(
                f"an artifact of {len(data)} bytes is above HUEYSERVE_MAX_ARTIFACT_BYTES "
                f"({self.max_bytes}); serve it from a URI instead"
            )
        digest = sha256_of(data)
        key = wire.artifact_key(digest)
        if self.conn.exists(key):
            return digest
        staging = f"{key}:upload:{uuid.uuid4().hex}"
        for start in range(0, max(len(data), 1), CHUNK_BYTES):
            with self.conn.pipeline() as pipe:
                pipe.append(staging, data[start : start + CHUNK_BYTES])
                pipe.expire(staging, UPLOAD_TTL_S)
                pipe.execute()
        self._store(keys=[staging, key], args=[UPLOAD_TTL_S])  # whole or not at all
        return digest

    def get(self, digest: str) -> bytes:
        """The artifact with this SHA-256, checked; ArtifactError if Redis lacks it."""
        key = wire.artifact_key(digest)
        size = int(self.conn.strlen(key))
        if size == 0 and not self.conn.exists(key):
            raise ArtifactError(f"artifact {digest} is not in Redis (deleted, or never published)")
        chunks: list[bytes] = [
            self.conn.getrange(key, start, start + CHUNK_BYTES - 1)  # type: ignore[misc]
            for start in range(0, size, CHUNK_BYTES)
        ]
        data = b"".join(chunks)
        if sha256_of(data) != digest:
            raise ArtifactError(f"artifact {digest} in Redis does not match its SHA-256")
        return data

    def keep(self, digests: list[str]) -> None:
        """Published: no longer expires. ArtifactError if one is gone (expired, collected)."""
        for digest in digests:
            if not self.conn.persist(wire.artifact_key(digest)) and not self.conn.exists(
                wire.artifact_key(digest)
            ):
                raise ArtifactError(
                    f"artifact {digest} is no longer in Redis (its upload expired after "
                    f"{UPLOAD_TTL_S} s, or it was deleted meanwhile): import it again"
                )

    def collect(self, used: set[str]) -> int:
        """Delete published artifacts no version uses (uploads in flight still expire on
        their own); how many. Run under the models lock, like every catalog change."""
        freed = 0
        for key in self.conn.scan_iter(match=wire.artifact_key("*"), count=500):
            name = key.decode() if isinstance(key, bytes) else key
            digest = name.rsplit(":", 1)[-1]
            if not SHA256.fullmatch(digest) or digest in used:
                continue
            if self.conn.ttl(name) == -1:
                freed += self.conn.delete(name)
        return freed
