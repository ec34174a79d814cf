"""Record (tabular) datasets: real-valued vectors ``(N, D)`` with feature names.

``csv:FILE``: a header row of feature names, one record per row, numeric values. Columns whose
values are all whole numbers (counts, scores, rounded readings) are integer-valued features
(``DataSpec.discrete_features``): models dequantize them, so a density of such a column is the
probability of its value.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .images import read_npy, split_fixed


def read_csv_records(path: Path) -> tuple[list[str], np.ndarray]:
    """Read a numeric CSV with a header: ``(feature_names, (N, D) float32)``; empty cells are NaN."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: CSV file not found") from None
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one record")
    names = [n.strip() for n in rows[0]]
    values = np.full((len(rows) - 1, len(names)), np.nan, dtype=np.float32)
    for i, row in enumerate(rows[1:]):
        if len(row) != len(names):
            raise DataError(f"{path}: line {i + 2} has {len(row)} fields, header has {len(names)}")
        for j, cell in enumerate(row):
            if cell.strip():
                try:
                    values[i, j] = float(cell)
                except ValueError:
                    raise DataError(f"{path}: line {i + 2}, column {names[j]!r}: {cell!r} is not a number") from None
    return names, values


def integer_columns(values: np.ndarray) -> list[int]:
    """Indices of the columns of ``values (N, D)`` whose every value is a whole number."""
    return [int(j) for j in np.flatnonzero((values == np.round(values)).all(axis=0))]


def _csv(spec: str, arg: str):  # noqa: ANN202 - returns models.data.Dataset (import cycle)
    from . import Dataset

    names, values = read_csv_records(Path(arg).expanduser())
    finite = values[np.isfinite(values).all(axis=1)]
    if len(finite) < 3:
        raise DataError(f"{arg}: need at least 3 complete records to train, found {len(finite)}")
    ranges = [(float(lo), float(hi)) for lo, hi in zip(finite.min(0), finite.max(0))]
    ds = DataSpec(kind="record", shape=(len(names),), feature_names=names, ranges=ranges,
                  discrete_features=integer_columns(finite) or None, source=spec)
    return Dataset(ds, split_fixed(finite))


def _waveform_npy(spec: str, arg: str):  # noqa: ANN202 - returns models.data.Dataset
    """``waveform:FILE.npy``: float windows ``(N, C, T)``; channels named ``ch0..``; split 90/5/5."""
    from . import Dataset

    path = Path(arg).expanduser()
    arr = read_npy(path)
    if arr.ndim != 3 or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path}: expected float waveform windows (N, C, T), got {arr.dtype} {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{path}: waveform windows contain NaN or infinite values")
    arr = arr.astype(np.float32)
    names = [f"ch{i}" for i in range(arr.shape[1])]
    ds = DataSpec(kind="waveform", shape=tuple(arr.shape[1:]), feature_names=names,
                  ranges=[(float(arr[:, i].min()), float(arr[:, i].max())) for i in range(arr.shape[1])], source=spec)
    return Dataset(ds, split_fixed(arr))


def _loaders() -> dict[str, Callable]:
    from .mimic import LOADERS as MIMIC

    return {"csv": _csv, "waveform": _waveform_npy, **MIMIC}


LOADERS: dict[str, Callable] = _loaders()
