"""ONNX models (`model.onnx`) on onnxruntime's CPU provider.

The signature comes from the session itself; only `classes` must come from metadata.json, as
an ONNX graph does not say what its probability columns mean. One session thread each way: a
worker already runs several threads, and more would only contend for the same cores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime

from hueyserve.artifacts import RUNTIME_ARTIFACTS
from hueyserve.worker.runtimes.base import DATATYPES, ModelLoadError, Runtime, Signature, Tensor

#: onnxruntime's tensor types -> Open Inference Protocol datatypes.
ONNX_DATATYPES: dict[str, str] = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64", "tensor(int8)": "INT8",
    "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}  # fmt: skip

ZIPMAP_REFUSED = (
    "output {name!r} is a list of dicts (skl2onnx's ZipMap), which hueyserve does not serve; "
    'convert the model with options={{"zipmap": False}} so probabilities come as one tensor'
)


class OnnxRuntime(Runtime):
    """One ONNX inference session; single-input models only."""

    name = "onnx"
    artifacts = RUNTIME_ARTIFACTS["onnx"]
    session: onnxruntime.InferenceSession
    given: Tensor

    def load(self) -> Signature:
        path = self.artifact()
        options = onnxruntime.SessionOptions()
        threads = int(self.options.get("onnx_threads", 1))
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads
        try:
            self.session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's errors share no public base class
            raise ModelLoadError(f"onnxruntime could not load {path}: {exc}") from exc
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelLoadError(
                f"{path} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "hueyserve serves single-input models: combine the inputs into one tensor"
            )
        self.given = _tensor(inputs[0])
        classes = self.metadata.get("classes")
        return Signature(
            (self.given,),
            tuple(_tensor(output) for output in self.session.get_outputs()),
            tuple(classes) if isinstance(classes, list) else None,
        )

    def predict(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        x = batch.astype(DATATYPES[self.given.datatype], copy=False)
        if x.ndim != len(self.given.shape):  # text [n] into [-1, 1], or rows into an image
            x = x.reshape((len(x), *(max(size, 1) for size in self.given.shape[1:])))
        results = self.session.run(None, {self.given.name: x})
        return {
            output.name: np.asarray(result)
            for output, result in zip(self.session.get_outputs(), results, strict=True)
        }


def _tensor(node: Any) -> Tensor:
    """An onnxruntime NodeArg as a Tensor; symbolic or unknown sizes become -1."""
    if node.type.startswith("seq(map("):
        raise ModelLoadError(ZIPMAP_REFUSED.format(name=node.name))
    if node.type not in ONNX_DATATYPES:
        raise ModelLoadError(
            f"{node.name!r} has type {node.type}; hueyserve serves tensors of "
            f"{', '.join(ONNX_DATATYPES)}"
        )
    shape = tuple(size if isinstance(size, int) else -1 for size in node.shape)
    return Tensor(node.name, ONNX_DATATYPES[node.type], shape)
