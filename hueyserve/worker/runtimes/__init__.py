"""The built-in runtimes, by the name metadata.json gives in `runtime` (see base.py).

Each runtime lives in its own module, imported on first use: a worker that serves only skops
models never imports onnxruntime, xgboost or lightgbm.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hueyserve.artifacts import ArtifactError, infer_runtime
from hueyserve.worker.runtimes.base import ModelLoadError, Runtime, Signature, Tensor

#: Runtime name -> (module in this package, class).
RUNTIMES: dict[str, tuple[str, str]] = {
    "sklearn": ("sklearn_runtime", "SklearnRuntime"),
    "onnx": ("onnx_runtime", "OnnxRuntime"),
    "xgboost": ("xgboost_runtime", "XGBoostRuntime"),
    "lightgbm": ("lightgbm_runtime", "LightGBMRuntime"),
    "python": ("python_runtime", "PythonRuntime"),
}

PYTHON_REFUSED = (
    "runtime 'python' runs model.py from the model folder; it is off unless "
    "HUEYSERVE_ALLOW_PYTHON_MODELS=true — turn it on only for model folders you trust"
)


def runtime_class(name: str) -> type[Runtime]:
    """The runtime called `name`, importing its module (and its library) now."""
    if name not in RUNTIMES:
        raise ModelLoadError(f"unknown runtime {name!r}; known runtimes: {', '.join(RUNTIMES)}")
    module_name, class_name = RUNTIMES[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    found: type[Runtime] = getattr(module, class_name)
    return found


def load_runtime(
    folder: Path, metadata: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[Runtime, Signature]:
    """The folder's model loaded by its runtime, and its signature checked against metadata's."""
    name = metadata.get("runtime") or _infer_runtime(folder)
    if name == "python" and not options.get("allow_python"):
        raise ModelLoadError(PYTHON_REFUSED)
    runtime = runtime_class(name)(folder, metadata, options)
    found = runtime.load()
    declared = Signature.from_metadata(metadata)
    if declared is None and metadata.get("inputs") and found is not None:
        # inputs alone: checked all the same (a metadata.json that expects another input)
        inputs = tuple(Tensor.from_json(t) for t in metadata["inputs"])
        _check(Signature(inputs, found.outputs), found)
    if found is None:
        if declared is None:
            raise ModelLoadError(
                f"runtime {name!r} cannot tell the model's signature: declare its inputs and "
                "outputs in metadata.json"
            )
        return runtime, declared
    if declared is not None and name == "python":
        # model.py's postprocess may add or change outputs: what it declares stands (the
        # smoke prediction checks it answers them); its inputs must still be the file's.
        _check(Signature(declared.inputs, found.outputs), found)
        return runtime, Signature(
            declared.inputs, declared.outputs, declared.classes or found.classes
        )
    if declared is not None:
        _check(declared, found)
        if found.classes is None and declared.classes is not None:
            found = Signature(found.inputs, found.outputs, declared.classes)
    return runtime, found


def _infer_runtime(folder: Path) -> str:
    """The runtime of a folder whose metadata names none (one saved by an older release)."""
    try:
        return infer_runtime(sorted(path.name for path in folder.iterdir()))
    except ArtifactError as exc:
        raise ModelLoadError(str(exc)) from exc


def _check(declared: Signature, found: Signature) -> None:
    """Refuse a metadata.json that describes another model than the file holds."""
    for kind, said, has in (
        ("inputs", declared.inputs, found.inputs),
        ("outputs", declared.outputs, found.outputs),
    ):
        if not _agree(said, has):
            raise ModelLoadError(
                f"signature mismatch: metadata.json declares {kind} {_show(said)} but the model "
                f"file has {_show(has)}; fix metadata.json or the model"
            )
    if found.classes is not None and declared.classes is not None:
        if list(found.classes) != list(declared.classes):
            raise ModelLoadError(
                f"signature mismatch: metadata.json declares classes {list(declared.classes)} "
                f"but the model file has {list(found.classes)}"
            )


def _agree(said: tuple[Tensor, ...], has: tuple[Tensor, ...]) -> bool:
    """Same names, datatypes and ranks; a size of -1 on either side matches any."""
    by_name = {t.name: t for t in has}
    if sorted(t.name for t in said) != sorted(by_name):
        return False
    for tensor in said:
        other = by_name[tensor.name]
        if tensor.datatype != other.datatype or len(tensor.shape) != len(other.shape):
            return False
        if any(a != b and -1 not in (a, b) for a, b in zip(tensor.shape, other.shape, strict=True)):
            return False
    return True


def _show(tensors: tuple[Tensor, ...]) -> str:
    return ", ".join(f"{t.name!r} {t.datatype} {list(t.shape)}" for t in tensors)
