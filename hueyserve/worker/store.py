"""The model store on disk: `<model_dir>/<name>/<version>/{model.skops,metadata.json}`.

Versions are positive integers; the highest complete one is the newest. A version directory is
written under a temporary name and renamed into place, so a reader never sees half a model.
Artifacts load only through skops with an explicit list of trusted types: a file that needs
anything else is refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import skops.io

from hueyserve.models import MODEL_NAME, VERSION

ARTIFACT_FILE = "model.skops"
METADATA_FILE = "metadata.json"
LOCK_FILE = ".lock"
HIGH_WATER_DIR = ".last_version"  #: <root>/.last_version/<name>: highest version ever written

#: Types a model file may contain beyond skops' own safe defaults (numpy, sklearn estimators).
TRUSTED_TYPES: list[str] = [
    "sklearn.tree._tree.Tree",
]


class UntrustedModelFile(ValueError):
    """A model file asks for types outside TRUSTED_TYPES."""


class ModelStore:
    """Read and write versioned models under one root directory."""

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
        """Complete versions of `name`, oldest first."""
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [
            p.name
            for p in folder.iterdir()
            if VERSION.fullmatch(p.name)  # a plain number: "007" or "٣" would never be served
            and (p / ARTIFACT_FILE).is_file()
            and (p / METADATA_FILE).is_file()
        ]
        return sorted(found, key=int)

    def latest(self, name: str) -> str | None:
        versions = self.versions(name)
        return versions[-1] if versions else None

    def metadata(self, name: str, version: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.root / name / version / METADATA_FILE).read_text())
        return data

    def load(self, name: str, version: str) -> Any:
        """The estimator saved as `name` `version`, loaded with trusted types only."""
        path = self.root / name / version / ARTIFACT_FILE
        untrusted = set(skops.io.get_untrusted_types(file=path)) - set(TRUSTED_TYPES)
        if untrusted:
            raise UntrustedModelFile(
                f"{path} needs types that are not trusted: {sorted(untrusted)}; add them to "
                "hueyserve.worker.store.TRUSTED_TYPES only if you trust the file's origin"
            )
        return skops.io.load(path, trusted=TRUSTED_TYPES)

    def save(self, name: str, estimator: Any, metadata: dict[str, Any]) -> str:
        """Write a new version (one above the newest) and return its number."""
        with self.lock():
            return self.add_version(name, estimator, metadata)

    def add_version(self, name: str, estimator: Any, metadata: dict[str, Any]) -> str:
        """`save` for a caller that already holds `lock()`."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        # Never reuse a number, even of a deleted version or model: caches key answers by
        # version. The mark lives outside the model's folder, so it outlives the folder.
        high_water = self.root / HIGH_WATER_DIR / name
        high_water.parent.mkdir(exist_ok=True)
        marks = [high_water, folder / HIGH_WATER_DIR]  # the second: where 0.1 kept it
        last = max((int(mark.read_text()) for mark in marks if mark.is_file()), default=0)
        version = str(max(last, int(self.latest(name) or 0)) + 1)
        high_water.write_text(version + "\n")
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=folder))
        skops.io.dump(estimator, staging / ARTIFACT_FILE)
        full = {**metadata, "name": name, "version": version}
        (staging / METADATA_FILE).write_text(json.dumps(full, indent=2) + "\n")
        os.rename(staging, folder / version)
        return version

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock across processes (workers bootstrapping at once); not re-entrant."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / LOCK_FILE, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
