"""The shared nouns of models: a model's entry (its versions' metadata and which version is
active), one version, and what a model answers. Workers publish entries to Redis
(hueyserve.worker.publishing); API processes keep a copy (hueyserve.api.catalog).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from hueyserve.errors import VersionNotFound

logger = logging.getLogger(__name__)

#: Model names: also directory names in the store, so nothing that could leave it.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Versions: positive integers (also directory names in the store).
VERSION = re.compile(r"[1-9][0-9]{0,17}")


def check_name_and_version(name: str, version: str) -> None:
    """A ValueError unless `name` and `version` are what the store could hold: read from
    Redis, they are checked as strictly as read from a request."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise ValueError(f"not a model name: {name!r}")
    if not isinstance(version, str) or not VERSION.fullmatch(version):
        raise ValueError(f"not a model version: {version!r}")


#: A model's answer: output name -> one value per input row (a column, not rows).
Outputs = dict[str, list[Any]]


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model and what it takes and gives (its saved metadata)."""

    name: str
    version: str
    metadata: dict[str, Any]
    active: bool = False

    @property
    def n_features(self) -> int:
        """Values per row of a numeric input (1 for text: one string per row)."""
        if "n_features" in self.metadata or not self.metadata.get("inputs"):
            return int(self.metadata["n_features"])
        shape = self.metadata["inputs"][0]["shape"]
        text = self.metadata["inputs"][0]["datatype"] == "BYTES"
        return int(shape[1]) if len(shape) == 2 and not text else 1

    @property
    def features(self) -> list[str]:
        return list(self.metadata.get("features") or [])

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """Input tensors (name, datatype, shape); models saved without them take one."""
        if self.metadata.get("inputs"):
            return list(self.metadata["inputs"])
        return [{"name": "features", "datatype": "FP64", "shape": [-1, self.n_features]}]

    @property
    def takes_text(self) -> bool:
        """Its input is text (BYTES): one string per row."""
        return bool(self.inputs[0]["datatype"] == "BYTES")

    @property
    def runtime(self) -> str:
        return str(self.metadata.get("runtime") or "sklearn")

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """Output tensors; for models saved without them, what LoadedModel.predict gives."""
        if self.metadata.get("outputs"):
            return list(self.metadata["outputs"])
        classes = self.classes
        if self.metadata.get("task") != "classification" or not classes:
            return [{"name": "predict", "datatype": "FP64", "shape": [-1]}]
        return [
            {"name": "predict", "datatype": label_datatype(classes), "shape": [-1]},
            {"name": "predict_proba", "datatype": "FP64", "shape": [-1, len(classes)]},
        ]

    @property
    def classes(self) -> list[Any] | None:
        """Class labels in the order of `predict_proba`, for a classifier."""
        return self.metadata.get("classes")


def example_rows(values: Any, datatype: str) -> np.ndarray:
    """Rows as the wire carries them: a 1-D str array for a text (BYTES) input, else a
    float64 array (2-D for rows of features)."""
    if not isinstance(values, list) or not values:
        raise ValueError("an example input is a non-empty list of rows")
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise ValueError("a text model's example is a list of strings")
        return np.asarray(values, dtype=str)
    return np.asarray(values, dtype=np.float64)


def label_datatype(classes: list[Any]) -> str:
    """The v2 datatype of a classifier's labels."""
    if all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        return "INT64"
    if all(isinstance(c, int | float) and not isinstance(c, bool) for c in classes):
        return "FP64"
    return "BYTES"


@dataclass(frozen=True)
class ModelEntry:
    """A model: the metadata of every version, and the active one. `pinned` means an operator
    chose the active version (reload); the periodic refresh then leaves it alone."""

    name: str
    active: str
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    pinned: bool = False

    def get(self, version: str | None = None) -> ModelVersion:
        """The active version, or the one asked for."""
        chosen = self.active if version is None else version
        metadata = self.versions.get(chosen)
        if metadata is None:
            raise VersionNotFound(self.name, chosen, list(self.versions))
        return ModelVersion(self.name, chosen, metadata, active=chosen == self.active)

    def version_list(self) -> list[str]:
        return sorted(self.versions, key=int)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "name": self.name,
                "active": self.active,
                "versions": self.versions,
                "pinned": self.pinned,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> ModelEntry:
        data = orjson.loads(raw)
        versions = data["versions"]
        if not isinstance(versions, dict) or not all(
            isinstance(m, dict) for m in versions.values()
        ):
            raise ValueError("versions must map each version to its metadata")
        entry = cls(data["name"], str(data["active"]), versions, bool(data["pinned"]))
        for version in entry.versions:  # written by workers, but read from Redis: check it
            check_name_and_version(entry.name, version)
        if entry.active not in entry.versions:
            raise ValueError(f"model {entry.name!r}: active version {entry.active!r} is unknown")
        return entry


def parse_entries(found: Mapping[Any, bytes | str]) -> dict[str, ModelEntry]:
    """Entries by name; one that does not parse (written by an older release, say) is left
    out, so the workers' refresh publishes it again in today's format."""
    parsed = {}
    for raw in found.values():
        try:
            entry = ModelEntry.from_json(raw)
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring a model entry that does not check out: %.80r", raw)
            continue
        parsed[entry.name] = entry
    return parsed
