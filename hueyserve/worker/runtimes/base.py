"""The runtime interface: how a worker loads one model version from its folder and predicts.

A runtime is a class with a `name` (the `runtime` field of metadata.json) and four methods:

- `load()` reads the folder's artifacts and returns the model's Signature (inputs and
  outputs with datatype and shape), or None when it cannot tell (a `python` model): then
  metadata.json must declare it. Called once per version per worker process.
- `predict(batch)` gets one array holding the rows of several requests (the worker batches
  them) and returns {output name: array}, each with exactly one entry per input row.
- `preprocess(rows)` and `postprocess(outputs)` (optional) run per request, outside the
  batched call: one request's failure there fails that request alone.

Batching, failure isolation and row alignment checks belong to the worker
(hueyserve.worker.registry, hueyserve.worker.batching), not to the runtime.

The batch is float64 [rows, n] for numeric inputs (cast it to what the model takes), or a 1-D
array of str for a BYTES input (text).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

#: Datatypes of the Open Inference Protocol and the numpy types they map to.
DATATYPES: dict[str, str] = {
    "BOOL": "?", "UINT8": "u1", "UINT16": "u2", "UINT32": "u4", "UINT64": "u8",
    "INT8": "i1", "INT16": "i2", "INT32": "i4", "INT64": "i8",
    "FP16": "f2", "FP32": "f4", "FP64": "f8", "BYTES": "O",
}  # fmt: skip


class ModelLoadError(ValueError):
    """A model version that cannot be served: the message says why and what to do."""


@dataclass(frozen=True)
class Tensor:
    """One input or output: its name, Open Inference Protocol datatype and shape (-1: any)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Tensor:
        name, datatype, shape = data.get("name"), data.get("datatype"), data.get("shape")
        if not isinstance(name, str) or not name:
            raise ModelLoadError(f"a tensor needs a 'name': {dict(data)!r}")
        if datatype not in DATATYPES:
            raise ModelLoadError(
                f"tensor {name!r}: datatype {datatype!r} is not one of {', '.join(DATATYPES)}"
            )
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise ModelLoadError(f"tensor {name!r}: shape must be a list of sizes (-1: any)")
        return cls(name, datatype, tuple(shape))


@dataclass(frozen=True)
class Signature:
    """What a model takes and gives. `classes` (optional) labels the columns of a classifier's
    probabilities; KServe v1 then answers {"class": ..., "probabilities": {...}} per row."""

    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    classes: tuple[Any, ...] | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        described: dict[str, Any] = {
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }
        if self.classes is not None:
            described["classes"] = list(self.classes)
        return described

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Signature | None:
        """The signature metadata.json declares, or None if it declares none."""
        if not metadata.get("inputs") or not metadata.get("outputs"):
            return None
        classes = metadata.get("classes")
        return cls(
            tuple(Tensor.from_json(t) for t in metadata["inputs"]),
            tuple(Tensor.from_json(t) for t in metadata["outputs"]),
            tuple(classes) if isinstance(classes, list) else None,
        )


class Runtime:
    """Base class of every runtime (and of a `python` runtime's `Model` in model.py).

    `folder` holds the version's artifacts, checked against their SHA-256 already;
    `metadata` is its metadata.json; `options` are operator settings a runtime may need
    (the sklearn runtime's extra trusted types)."""

    name: ClassVar[str] = ""
    #: Artifact file names this runtime recognises, to infer the runtime of a folder that
    #: does not name one (the first is what `load` reads).
    artifacts: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self, folder: Path, metadata: Mapping[str, Any], options: Mapping[str, Any] | None = None
    ) -> None:
        self.folder = folder
        self.metadata = metadata
        self.options = dict(options or {})

    def load(self) -> Signature | None:
        raise NotImplementedError

    def predict(self, batch: np.ndarray) -> Mapping[str, Any]:
        raise NotImplementedError

    def preprocess(self, rows: np.ndarray) -> np.ndarray:
        """One request's rows before they join a batch; by default unchanged."""
        return rows

    def postprocess(self, outputs: dict[str, np.ndarray]) -> Mapping[str, Any]:
        """One request's outputs after the batched call; by default unchanged."""
        return outputs

    def declared_input_name(self, default: str) -> str:
        """The input's name in metadata.json, else `default`: a model imported or trained
        under another name keeps it."""
        inputs = self.metadata.get("inputs")
        if isinstance(inputs, list) and len(inputs) == 1 and isinstance(inputs[0], Mapping):
            name = inputs[0].get("name")
            if isinstance(name, str) and name:
                return name
        return default

    def probed_signature(self, n_features: int, datatype: str) -> Signature:
        """One input of `n_features` numbers and one output, `predict`, shaped as the answer
        for one row of zeros is (a booster's: [-1], or [-1, classes])."""
        probe = np.asarray(self.predict(np.zeros((1, n_features)))["predict"])
        classes = self.metadata.get("classes")
        return Signature(
            (Tensor(self.declared_input_name("features"), datatype, (-1, n_features)),),
            (Tensor("predict", datatype, (-1, *probe.shape[1:])),),
            tuple(classes) if isinstance(classes, list) else None,
        )

    def artifact(self) -> Path:
        """The folder's artifact of this runtime: the first of `artifacts` that exists."""
        for candidate in self.artifacts:
            if (self.folder / candidate).is_file():
                return self.folder / candidate
        raise ModelLoadError(
            f"{self.folder} has none of {', '.join(self.artifacts)} for runtime {self.name!r}"
        )
