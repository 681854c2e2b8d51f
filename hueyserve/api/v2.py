"""The Open Inference Protocol v2 (REST), as KServe, Triton and MLServer speak it.

Tensors travel as JSON (`data`, flat or nested, row-major) or, with Triton's binary tensor
data extension, as raw little-endian bytes after a JSON header whose length the
`Inference-Header-Content-Length` header gives; tritonclient sends and asks for binary by
default. Triton's schedule-policy parameters are honoured with Triton's meaning: `priority`
1 is the most urgent (0 = default) and `timeout` is in microseconds.

The module is over 300 lines on purpose: it is the whole codec of one protocol (bodies,
binary tensors, schedule policy, outputs, metadata), which is read and changed together.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, JsonValue, StrictInt, ValidationError

from hueyserve.api.inputs import text_rows
from hueyserve.api.schemas import MAX_DURATION_S, MAX_STRING
from hueyserve.api.validation import validation_failure
from hueyserve.errors import (
    BadRequest,
    InvalidInput,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
)
from hueyserve.models import ModelVersion, Outputs

BINARY_HEADER = "Inference-Header-Content-Length"
EXTENSIONS = ["binary_tensor_data", "schedule_policy", "parameters"]
#: Numeric tensor types and their little-endian numpy layout (BYTES: text, see decode_texts).
NUMERIC: dict[str, str] = {
    "BOOL": "?", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
MAX_PRIORITY_LEVEL = 100  # Triton level p runs at hueyserve priority 101 - p

Parameters = dict[str, JsonValue]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = None


class RequestInput(BaseModel):
    model_config = ConfigDict(str_max_length=MAX_STRING)

    name: str = Field(max_length=200)
    shape: list[StrictInt] = Field(max_length=8)
    datatype: str = Field(max_length=20)
    parameters: Parameters | None = None
    data: JsonValue = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(str_max_length=MAX_STRING)

    name: str = Field(max_length=200)
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    model_config = ConfigDict(str_max_length=MAX_STRING)

    id: str | None = Field(default=None, max_length=200)
    parameters: Parameters | None = None
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = Field(default=None, min_length=1)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


# --- requests ---------------------------------------------------------------------------------


def check_media(content_type: str | None, content_encoding: str | None) -> None:
    """A 415 unless the body is JSON, or JSON then binary tensors, sent as is."""
    media = (content_type or "").split(";")[0].strip().lower()
    if media not in ("", "application/json", "application/octet-stream"):
        raise UnsupportedMediaType(
            f"send the body as 'Content-Type: application/json' (or application/octet-stream "
            f"with {BINARY_HEADER} for binary tensors), not {media!r}"
        )
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise UnsupportedMediaType(
            f"Content-Encoding {content_encoding!r} is not supported: send the body uncompressed"
        )


def parse_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, bytes]:
    """The JSON part of an infer request and the binary tensor bytes after it (may be empty)."""
    split = len(body)
    if header_length is not None:
        if not (header_length.isascii() and header_length.isdigit()) or int(header_length) > len(
            body
        ):
            raise BadRequest(
                f"{BINARY_HEADER}: {header_length!r} is not a length within the "
                f"{len(body)}-byte body"
            )
        split = int(header_length)
    try:
        request = InferenceRequest.model_validate_json(body[:split])
    except ValidationError as exc:
        problems = [{**p, "loc": ("body", *p["loc"])} for p in exc.errors(include_input=False)]
        raise validation_failure(problems, "application/json") from exc
    return request, body[split:]


def decode_features(
    request: InferenceRequest, binary: bytes, model: ModelVersion, *, max_rows: int
) -> np.ndarray:
    """The request's one input tensor as a float64 array [rows, n_features]; the shape is
    checked before any data is decoded."""
    expected = model.inputs[0]
    if len(request.inputs) != 1:
        raise InvalidInput(f"model {model.name!r} takes one input, {expected['name']!r}")
    tensor = request.inputs[0]
    if tensor.name != expected["name"]:
        raise InvalidInput(
            f"model {model.name!r} has no input {tensor.name!r}; its input is "
            f"{expected['name']!r} with shape {expected['shape']}"
        )
    if model.takes_text:
        return decode_texts(tensor, binary, model, max_rows=max_rows)
    dtype = NUMERIC.get(tensor.datatype)
    if dtype is None:
        raise InvalidInput(
            f"inputs[0].datatype {tensor.datatype!r} is not a number type; "
            f"use one of {', '.join(NUMERIC)}"
        )
    shape = tensor.shape
    if len(shape) != 2 or shape[1] != model.n_features or shape[0] < 0:
        raise InvalidInput(
            f"inputs[0].shape is {shape}; model {model.name!r} takes [rows, {model.n_features}]"
        )
    if shape[0] > max_rows:
        raise PayloadTooLarge(
            f"{shape[0]} rows in one request; the limit is {max_rows} "
            "(HUEYSERVE_MAX_INSTANCES): split the request"
        )
    count = math.prod(shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        values = _binary_values(size, binary, dtype, count)
    else:
        values = _json_values(tensor.data, tensor.datatype)
    if values.size != count:
        raise InvalidInput(
            f"inputs[0] has {values.size} values but shape {tensor.shape} needs {count}"
        )
    return values.reshape(shape).astype(np.float64)


def decode_texts(
    tensor: RequestInput, binary: bytes, model: ModelVersion, *, max_rows: int
) -> np.ndarray:
    """A text input (BYTES, shape [rows] or [rows, 1]) as a 1-D array of strings, from JSON
    strings or Triton's binary BYTES layout (a 4-byte little-endian length before each)."""
    name = tensor.name
    if tensor.datatype != "BYTES":
        raise InvalidInput(
            f"input {name!r} of model {model.name!r} is text: send datatype BYTES, "
            f"not {tensor.datatype}"
        )
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 0:
        raise InvalidInput(
            f"input {name!r} has shape {shape}; a text input takes [rows] or [rows, 1]"
        )
    if shape[0] > max_rows:
        raise PayloadTooLarge(
            f"{shape[0]} rows in one request; the limit is {max_rows} "
            "(HUEYSERVE_MAX_INSTANCES): split the request"
        )
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise BadRequest(
                f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header"
            )
        texts = _binary_texts(name, binary)
    else:
        texts = _json_texts(name, tensor.data)
    if len(texts) != shape[0]:
        raise InvalidInput(
            f"input {name!r} has {len(texts)} strings but shape {shape} needs {shape[0]}"
        )
    return text_rows(texts, max_rows=max_rows)


def _json_texts(name: str, data: JsonValue) -> list[str]:
    if data is None:
        raise InvalidInput(f"input {name!r} has no data: send 'data', or binary data with its size")
    flat = data if isinstance(data, list) else [data]
    texts: list[str] = []
    for item in flat:
        for value in item if isinstance(item, list) else [item]:
            if not isinstance(value, str):
                raise InvalidInput(
                    f"input {name!r} holds {type(value).__name__} {str(value)[:20]!r}; a text "
                    "input takes strings"
                )
            texts.append(value)
    return texts


def _binary_texts(name: str, binary: bytes) -> list[str]:
    texts, offset = [], 0
    while offset < len(binary):
        if offset + 4 > len(binary):
            raise InvalidInput(f"input {name!r}: binary BYTES data ends inside a length prefix")
        (length,) = struct.unpack_from("<I", binary, offset)
        start, offset = offset + 4, offset + 4 + length
        if offset > len(binary):
            raise InvalidInput(f"input {name!r}: a string's length runs past the binary data")
        try:
            texts.append(binary[start:offset].decode())
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"input {name!r}: a string is not UTF-8 ({exc})") from exc
    return texts


def _binary_values(size: Any, binary: bytes, dtype: str, count: int) -> np.ndarray:
    if not isinstance(size, int) or size != len(binary):
        raise BadRequest(
            f"binary_data_size {size!r} does not match the {len(binary)} bytes after the header"
        )
    itemsize = np.dtype(dtype).itemsize
    if size != count * itemsize:
        raise InvalidInput(f"{size} bytes of binary data; the shape needs {count * itemsize}")
    return np.frombuffer(binary, dtype=dtype)


def _json_values(data: JsonValue, datatype: str) -> np.ndarray:
    if data is None:
        raise InvalidInput("inputs[0] has no data: send 'data', or binary data with its size")
    try:
        values = np.asarray(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(f"inputs[0].data is not a regular array: {exc}") from exc
    if values.dtype.kind == "O" and datatype.startswith("FP"):
        values = _big_integers(values)  # 10**30 is a number to v1, so it is one here too
    kinds = "b" if datatype == "BOOL" else "iuf"
    if values.dtype.kind not in kinds:
        raise InvalidInput(f"inputs[0].data must hold only numbers for datatype {datatype}")
    return values.ravel()


def _big_integers(values: np.ndarray) -> np.ndarray:
    """Integers beyond int64 (numpy keeps them as objects) as floats; anything else as is."""
    flat = values.ravel()
    if not all(type(value) in (int, float) for value in flat):
        return values
    try:
        return flat.astype(np.float64)
    except OverflowError as exc:
        raise InvalidInput("inputs[0].data holds an integer beyond any float") from exc


@dataclass(frozen=True)
class Schedule:
    """Triton's schedule-policy parameters in hueyserve's terms."""

    priority: int | None  #: 0-100, higher first; None = the default
    timeout_s: float | None


def schedule(parameters: Parameters | None) -> Schedule:
    parameters = parameters or {}
    level = parameters.get("priority", 0)
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= 100:
        raise InvalidInput(
            "parameters.priority follows Triton: 1 is the most urgent, up to "
            f"{MAX_PRIORITY_LEVEL}; 0 means the default"
        )
    timeout = parameters.get("timeout")
    if timeout is not None and (
        not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0
    ):
        raise InvalidInput("parameters.timeout is a whole number of microseconds above 0")
    if timeout is not None and timeout > MAX_DURATION_S * 1_000_000:
        raise InvalidInput(
            f"parameters.timeout is at most {MAX_DURATION_S * 1_000_000} microseconds (a year)"
        )
    return Schedule(
        priority=MAX_PRIORITY_LEVEL + 1 - level if level else None,
        timeout_s=timeout / 1e6 if timeout else None,
    )


@dataclass(frozen=True)
class Selected:
    """One output to answer with, and whether as binary data."""

    name: str
    binary: bool


def select_outputs(request: InferenceRequest, model: ModelVersion) -> list[Selected]:
    """The outputs asked for (all when none are named), each in JSON or binary."""
    binary_default = (request.parameters or {}).get("binary_data_output") is True
    known = [o["name"] for o in model.outputs]
    if request.outputs is None:
        return [Selected(name, binary_default) for name in known]
    selected = []
    for wanted in request.outputs:
        if wanted.name not in known:
            raise InvalidInput(
                f"model {model.name!r} has no output {wanted.name!r}; outputs: {', '.join(known)}"
            )
        binary = (wanted.parameters or {}).get("binary_data", binary_default)
        selected.append(Selected(wanted.name, binary is True))
    return selected


# --- responses --------------------------------------------------------------------------------


def v2_response(
    model: ModelVersion,
    outputs: Outputs,
    *,
    request_id: str | None,
    selected: list[Selected] | None = None,
    parameters: Parameters | None = None,
) -> InferenceResponse:
    """The outputs as JSON tensors (binary ones are filled in by `encode`)."""
    described = {o["name"]: o for o in model.outputs}
    wanted = [Selected(name, False) for name in described] if selected is None else selected
    tensors = []
    for choice in wanted:
        values = np.asarray(outputs[choice.name])
        tensors.append(
            ResponseOutput(
                name=choice.name,
                shape=list(values.shape),
                datatype=described[choice.name]["datatype"],
                data=values.ravel().tolist(),
            )
        )
    return InferenceResponse(
        model_name=model.name,
        model_version=model.version,
        id=request_id,
        parameters=parameters,
        outputs=tensors,
    )


def encode(response: InferenceResponse, selected: list[Selected]) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when binary tensors follow it."""
    chunks = []
    for tensor, choice in zip(response.outputs, selected, strict=True):
        if choice.binary:
            raw = _to_bytes(tensor.data or [], tensor.datatype)
            tensor.data = None
            tensor.parameters = {**(tensor.parameters or {}), "binary_data_size": len(raw)}
            chunks.append(raw)
    header = orjson.dumps(response.model_dump(exclude_none=True))
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def _to_bytes(values: list[Any], datatype: str) -> bytes:
    if datatype == "BYTES":  # each element: 4-byte little-endian length, then the bytes
        encoded = [str(v).encode() for v in values]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    if datatype not in NUMERIC:
        raise ServiceError(f"cannot encode datatype {datatype} as binary")
    return np.asarray(values, dtype=NUMERIC[datatype]).tobytes()


def model_metadata(model: ModelVersion, versions: list[str]) -> ModelMetadata:
    metadata = model.metadata
    return ModelMetadata(
        name=model.name,
        versions=versions,
        platform=model.runtime,
        inputs=[TensorMetadata(**t) for t in model.inputs],
        outputs=[TensorMetadata(**t) for t in model.outputs],
        parameters={
            "version": model.version,
            "active": model.active,
            "task": metadata.get("task"),
            "estimator": metadata.get("estimator"),
            "runtime": model.runtime,
            "features": model.features,
            "classes": model.classes,
            "metrics": metadata.get("metrics"),
            "created": metadata.get("created"),
        },
    )
