"""One host's model folder: `<model_dir>/<name>/<version>/` holding a version's artifacts and
its `metadata.json` (hueyserve.artifacts). It is a cache of the catalog in Redis
(hueyserve.worker.repository), and the place to drop a folder by hand: the refresh imports a
version it finds here that the deployment has never allocated.

A folder is written under a temporary name and renamed into place, so a reader never sees half
a version; one whose files no longer match the catalog is moved aside, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import skops.io

from hueyserve.artifacts import METADATA_FILE, RUNTIME_ARTIFACTS
from hueyserve.models import MODEL_NAME, VERSION
from hueyserve.worker.runtimes.sklearn_runtime import TRUSTED_TYPES

ARTIFACT_FILE = "model.skops"  #: what `save` writes (trained models)
LOCK_FILE = ".lock"
STAGING_DIR = ".staging"  #: folders being written (trainings, fetches)
REPLACED_DIR = ".replaced"  #: local folders that disagreed with the catalog, kept for a look
KNOWN_ARTIFACTS = frozenset(name for names in RUNTIME_ARTIFACTS.values() for name in names)


class ModelStore:
    """Read and write versioned model folders under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and MODEL_NAME.fullmatch(p.name) and self.versions(p.name)
        )

    def versions(self, name: str) -> list[str]:
        """Complete versions of `name` (a metadata.json or a known artifact), oldest first."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [
            p.name
            for p in folder.iterdir()
            if VERSION.fullmatch(p.name)  # a plain number: "007" or "٣" would never be served
            and p.is_dir()
            and any((p / f).is_file() for f in (METADATA_FILE, *KNOWN_ARTIFACTS))
        ]
        return sorted(found, key=int)

    def latest(self, name: str) -> str | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def folder(self, name: str, version: str) -> Path:
        return self.root / name / version

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        """The folder's metadata.json ({} for a folder dropped without one)."""
        path = self.folder(name, version) / METADATA_FILE
        if not path.is_file():
            return {}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def load(self, name: str, version: str) -> Any:
        """The scikit-learn estimator saved as `name` `version` (trusted types only)."""
        path = self.folder(name, version) / ARTIFACT_FILE
        return skops.io.load(path, trusted=list(TRUSTED_TYPES))

    def save(self, name: str, estimator: Any, metadata: dict[str, Any]) -> str:
        """Write an estimator as the next version of this folder (as if dropped here by hand:
        the refresh imports it); its number."""
        with self.lock():
            version = str(int(self.latest(name) or 0) + 1)
            with self.staging() as staging:
                write_estimator(staging, estimator, {**metadata, "name": name, "version": version})
                self.install(name, version, staging)
            return version

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder under the root, removed afterwards unless installed meanwhile."""
        parent = self.root / STAGING_DIR
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def install(self, name: str, version: str, source: Path) -> Path:
        """Move a finished folder into place as `name` `version`; a folder already there (one
        that disagreed with the catalog) is moved to REPLACED_DIR first."""
        target = self.folder(name, version)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            aside = self.root / REPLACED_DIR / f"{name}-{version}-{time.time_ns()}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(target, aside)
        temp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=target.parent))
        shutil.copytree(source, temp, dirs_exist_ok=True)
        try:
            os.rename(temp, target)
        except OSError:  # another process of this host installed it meanwhile: theirs stands
            shutil.rmtree(temp, ignore_errors=True)
        return target

    def remove(self, name: str, version: str) -> None:
        """Forget a deleted version's local copy."""
        shutil.rmtree(self.folder(name, version), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / name).rmdir()  # the last version: the model's folder too

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock across processes of this host; not re-entrant."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def write_estimator(folder: Path, estimator: Any, metadata: dict[str, Any]) -> None:
    """A scikit-learn version's folder: model.skops and its metadata."""
    skops.io.dump(estimator, folder / ARTIFACT_FILE)
    write_metadata(folder, metadata)


def write_metadata(folder: Path, metadata: dict[str, Any]) -> None:
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
