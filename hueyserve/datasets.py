"""Training data: a data set bundled with scikit-learn, or a CSV file inside the data folder.

A source is named by a string so a job, a model's metadata and the scheduled retrain can all
say where the data comes from: `iris`, `diabetes`, `wine`, `breast_cancer`, or `<file>.csv`
(relative to HUEYSERVE_DATASET_DIR; a header row, numeric features, the target in a named column
or the last one). The fingerprint changes when the data does, so a retrain can tell.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from sklearn import datasets as sk_datasets

#: Data sets that ship inside scikit-learn: no download, always there.
BUNDLED: dict[str, Callable[[], Any]] = {
    "diabetes": sk_datasets.load_diabetes,
    "iris": sk_datasets.load_iris,
    "wine": sk_datasets.load_wine,
    "breast_cancer": sk_datasets.load_breast_cancer,
}


class DatasetError(ValueError):
    """The data source is unknown, outside the data folder, or unreadable; says what to fix."""


@dataclass(frozen=True)
class Dataset:
    source: str
    features: np.ndarray  #: float64, one row per sample
    target: np.ndarray  #: numbers (regression) or labels (classification)
    feature_names: list[str]
    target_name: str
    fingerprint: str  #: changes whenever the data does


def check_source(source: str, data_dir: Path, target: str | None = None) -> Path | None:
    """Raise DatasetError unless `source` names a bundled set or an existing CSV inside
    `data_dir` (with a `target` column, when named); returns the CSV's path (None for a
    bundled set)."""
    if source in BUNDLED:
        return None
    if not source.endswith(".csv"):
        raise DatasetError(
            f"unknown dataset {source!r}: use one bundled with scikit-learn "
            f"({', '.join(BUNDLED)}) or a .csv file in the data folder (HUEYSERVE_DATASET_DIR)"
        )
    root = data_dir.resolve()
    try:
        path = (root / source).resolve()
        exists = path.is_file()
    except (OSError, ValueError) as exc:  # NUL bytes, names too long for the file system
        raise DatasetError(f"dataset {source!r} is not a usable file name: {exc}") from exc
    if not path.is_relative_to(root):
        raise DatasetError(f"dataset {source!r} is outside the data folder; name a file inside it")
    if not exists:
        raise DatasetError(f"no file {source!r} in the data folder {root}")
    if target is not None:
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                header = next(csv.reader(handle), [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"{source}: cannot read its header row ({exc})") from exc
        if target not in header:
            raise DatasetError(f"{source}: no column {target!r}; columns: {', '.join(header)}")
    return path


def fingerprint(source: str, data_dir: Path) -> str:
    """What `Dataset.fingerprint` would be, without parsing the data."""
    path = check_source(source, data_dir)
    return _bundled_fingerprint(source) if path is None else _file_fingerprint(path.read_bytes())


def _bundled_fingerprint(name: str) -> str:
    return f"sklearn-{sklearn.__version__}:{name}"


def _file_fingerprint(raw: bytes) -> str:
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def load(source: str, data_dir: Path, target: str | None = None) -> Dataset:
    """The data behind `source`; `target` names the CSV column to predict (default: the last)."""
    path = check_source(source, data_dir)
    if path is None:
        return _bundled(source)
    return _csv(source, path.read_bytes(), target)


def _bundled(name: str) -> Dataset:
    data = BUNDLED[name]()
    target = data.target
    if getattr(data, "target_names", None) is not None:  # classes by name, not by index
        target = np.asarray(data.target_names)[target]
    return Dataset(
        source=name,
        features=np.asarray(data.data, dtype=np.float64),
        target=target,
        feature_names=[str(f) for f in data.feature_names],
        target_name="target",
        fingerprint=_bundled_fingerprint(name),
    )


def _csv(source: str, raw: bytes, target: str | None) -> Dataset:
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"))))
    if len(rows) < 3:
        raise DatasetError(f"{source}: needs a header row and at least two data rows")
    header, body = rows[0], [row for row in rows[1:] if row]
    if len(header) < 2:
        raise DatasetError(f"{source}: needs at least one feature column and a target column")
    target_name = target or header[-1]
    if target_name not in header:
        raise DatasetError(f"{source}: no column {target_name!r}; columns: {', '.join(header)}")
    column = header.index(target_name)
    feature_names = [name for i, name in enumerate(header) if i != column]
    features, labels = [], []
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DatasetError(f"{source} line {line}: {len(row)} fields, header has {len(header)}")
        try:
            features.append([float(v) for i, v in enumerate(row) if i != column])
        except ValueError as exc:
            raise DatasetError(f"{source} line {line}: features must be numbers ({exc})") from exc
        labels.append(row[column])
    return Dataset(
        source=source,
        features=np.asarray(features, dtype=np.float64),
        target=_labels_or_numbers(labels),
        feature_names=feature_names,
        target_name=target_name,
        fingerprint=_file_fingerprint(raw),
    )


def _labels_or_numbers(values: list[str]) -> np.ndarray:
    """Numbers when every value is one (a regression target, or numeric classes), else labels."""
    try:
        return np.asarray([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return np.asarray(values)
