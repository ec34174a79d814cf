"""Loaders for MIMIC-III style exports, and the generated cohort as the embedded default.

Vitals (``mimic-vitals[:DIR]``): the MIMIC-III benchmark's per-episode ``*_timeseries.csv`` files
(``Hours`` plus the 17 variables, Glasgow coma scale components as text such as
``"4 Spontaneously"``), or one flat CSV of records with the same column names
(``mimic-vitals:FILE.csv``; optional ``patient``/``hour`` columns). Each row is one patient-hour.
Missing values are imputed: carried forward within the episode, else the benchmark's normal value
(:data:`~models.data.mimic_schema.VITALS`); :func:`impute` also returns the masks of imputed cells.
In the training split, variables not yet observed in their episode get a random donor value
instead (:func:`hot_deck`); validation and test records keep the normal value, as in scoring.

Waveforms (``mimic-waveform[:DIR]``): WFDB records (``.hea`` + ``.dat``, read with ``wfdb``) or CSV
exports (a header naming the channels, optionally quoted, optionally followed by a units row) with
PLETH and ABP at 125 Hz, cut into non-overlapping 1024-sample windows (windows with gaps are
dropped). Scaling: ``mimic-waveform`` applies the fixed global scaling
:data:`~models.data.mimic_schema.WAVE_SCALING` (for serving across patients);
``mimic-waveform-minmax`` scales each window's channels to [0, 1] as the ButterflyFlow paper did.

Without a path, both load a generated cohort (:mod:`models.data.cohort`), normal records only.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..errors import DataError
from ..spec import DataSpec
from .cohort import generate_vitals, generate_waveforms
from .images import split_fixed
from .mimic_schema import GCS_TEXT, SAMPLE_RATE_HZ, VITAL_DERIVED, VITAL_GROUPS, VITAL_NAMES, VITALS, WAVE_CHANNELS, WAVE_SCALING, WAVE_UNITS, WINDOW

_LEADING_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)")


def parse_vital(name: str, cell: str) -> float:
    """One cell of a benchmark CSV → float (NaN when empty). GCS text maps to its score."""
    cell = cell.strip()
    if not cell:
        return float("nan")
    try:
        return float(cell)
    except ValueError:
        pass
    if name in GCS_TEXT:
        m = _LEADING_NUMBER.match(cell)
        if m:
            return float(m.group(1))
        key = cell.lower().strip()
        if key in GCS_TEXT[name]:
            return float(GCS_TEXT[name][key])
    raise ValueError(f"{cell!r} is not a value of {name!r}")


def read_timeseries_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One benchmark episode → ``(hours (T,), values (T, 17))`` float32 with NaN where missing."""
    try:
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    if not rows:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    missing = [n for n in ("Hours", *VITAL_NAMES) if n not in header]
    if missing:
        raise DataError(f"{path}: not a benchmark timeseries file; missing columns {', '.join(missing)}")
    col = {n: header.index(n) for n in ("Hours", *VITAL_NAMES)}
    hours = np.empty(len(rows) - 1, dtype=np.float32)
    values = np.full((len(rows) - 1, len(VITALS)), np.nan, dtype=np.float32)
    for i, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i + 2} has {len(row)} fields, header has {len(header)}")
        try:
            hours[i] = float(row[col["Hours"]])
            for j, name in enumerate(VITAL_NAMES):
                values[i, j] = parse_vital(name, row[col[name]])
        except ValueError as e:
            raise DataError(f"{path}: line {i + 2}: {e}") from None
    return hours, values


def hourly(hours: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Bin an episode's charted rows into patient-hours (last observation in each hour wins): ``(H, 17)``."""
    if len(hours) == 0:
        return np.empty((0, len(VITALS)), dtype=np.float32)
    bins = np.floor(np.maximum(hours, 0)).astype(int)
    out = np.full((bins.max() + 1, len(VITALS)), np.nan, dtype=np.float32)
    for b, row in zip(bins, values):
        seen = np.isfinite(row)
        out[b, seen] = row[seen]
    return out


class Imputed(NamedTuple):
    """``values (N, 17)`` with no gaps; ``imputed`` marks every filled cell; ``unseen`` the cells filled
    with the normal value because the variable had not been observed yet in the episode."""

    values: np.ndarray
    imputed: np.ndarray
    unseen: np.ndarray


def impute(values: np.ndarray, episode: np.ndarray | None = None) -> Imputed:
    """Carry each variable forward within its episode, else use its normal value.

    ``values (N, 17)`` in episode order, ``episode (N,)`` ids (one episode when omitted).
    """
    values = np.array(values, dtype=np.float32, copy=True)
    mask = ~np.isfinite(values)
    episode = np.zeros(len(values), dtype=int) if episode is None else np.asarray(episode)
    last = np.full(values.shape[1], np.nan, dtype=np.float32)
    for i in range(len(values)):
        if i == 0 or episode[i] != episode[i - 1]:
            last[:] = np.nan
        row = values[i]
        seen = np.isfinite(row)
        last[seen] = row[seen]
        row[~seen] = last[~seen]
    normal = np.array([v.normal for v in VITALS], dtype=np.float32)
    still = ~np.isfinite(values)
    values[still] = np.broadcast_to(normal, values.shape)[still]
    return Imputed(values, mask, still)


def hot_deck(values: np.ndarray, unseen: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-time imputation of never-observed continuous variables: a random donor value.

    Every cell flagged in ``unseen (N, D)`` of a continuous variable gets a value drawn from the
    cells of the same variable that are known (observed or carried forward). Filling them all
    with one normal value would put a point mass there, and the flow would learn a density spike
    that makes "never measured" records look far more likely than measured ones: a large
    variance in the NLL that has nothing to do with anomalies (it cost the hypotension AUROC
    0.78 vs 0.87; ``docs/benchmarks.md``). Scoring still fills with one value (the normal value
    in the loaders, the calibration median in the service), which lies inside the donors' range.
    Discrete variables (the Glasgow coma scale, whose components must sum to the total) keep
    their normal value: their likelihood is a bounded bin probability, not a spike.
    """
    out = np.array(values, dtype=np.float32, copy=True)
    for j, var in enumerate(VITALS):
        rows = unseen[:, j]
        donors = out[~rows, j]
        if var.discrete or not rows.any() or len(donors) == 0:
            continue
        out[rows, j] = rng.choice(donors, int(rows.sum()))
    return out


def vitals_spec(source: str) -> DataSpec:
    return DataSpec(kind="record", shape=(len(VITALS),), feature_names=list(VITAL_NAMES), units=[v.unit for v in VITALS],
                    ranges=[(float(v.low), float(v.high)) for v in VITALS], source=source,
                    discrete_features=[i for i, v in enumerate(VITALS) if v.discrete],
                    feature_groups={k: list(v) for k, v in VITAL_GROUPS.items()}, derived={k: list(v) for k, v in VITAL_DERIVED.items()})


def read_vitals(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A directory of ``*_timeseries.csv`` episodes or one flat CSV → ``(hourly values (N, 17), episode ids (N,))``."""
    if path.is_dir():
        files = sorted(path.rglob("*_timeseries.csv"))
        if not files:
            raise DataError(f"{path}: no *_timeseries.csv files (MIMIC-III benchmark episodes) found")
        blocks, ids = [], []
        for k, f in enumerate(files):
            h = hourly(*read_timeseries_csv(f))
            blocks.append(h)
            ids.append(np.full(len(h), k))
        return np.concatenate(blocks), np.concatenate(ids)
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty file")
    header = [h.strip() for h in rows[0]]
    missing = [n for n in VITAL_NAMES if n not in header]
    if missing:
        raise DataError(f"{path}: missing columns {', '.join(missing)}")
    values = np.full((len(rows) - 1, len(VITALS)), np.nan, dtype=np.float32)
    episode = np.zeros(len(rows) - 1, dtype=int)
    pcol = header.index("patient") if "patient" in header else None
    for i, row in enumerate(rows[1:]):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i + 2} has {len(row)} fields, header has {len(header)}")
        try:
            for j, name in enumerate(VITAL_NAMES):
                values[i, j] = parse_vital(name, row[header.index(name)])
            if pcol is not None:
                episode[i] = int(float(row[pcol]))
        except ValueError as e:
            raise DataError(f"{path}: line {i + 2}: {e}") from None
    return values, episode


def write_timeseries_csv(path: Path, hours: np.ndarray, values: np.ndarray) -> None:
    """Write one episode in the benchmark's format (GCS components as their text labels)."""
    from .mimic_schema import GCS_LABELS

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Hours", *VITAL_NAMES])
        for h, row in zip(hours, values):
            cells = []
            for name, v in zip(VITAL_NAMES, row):
                if not np.isfinite(v):
                    cells.append("")
                elif name in GCS_LABELS:
                    cells.append(GCS_LABELS[name][int(round(v))])
                else:
                    cells.append(f"{v:g}")
            w.writerow([f"{h:.2f}", *cells])


# ---------------------------------------------------------------- waveforms


def _channels(names: list[str], where: str) -> list[int]:
    upper = [n.strip().strip("'\"").upper() for n in names]
    missing = [c for c in WAVE_CHANNELS if c not in upper]
    if missing:
        raise DataError(f"{where}: no {' or '.join(missing)} channel (found {', '.join(names) or 'none'})")
    return [upper.index(c) for c in WAVE_CHANNELS]


def read_wfdb(path: Path) -> np.ndarray:
    """A WFDB record (``path`` with or without ``.hea``) → ``(T, 2)`` PLETH, ABP at 125 Hz (NaN in gaps)."""
    import wfdb

    record = str(path.with_suffix("")) if path.suffix == ".hea" else str(path)
    try:
        rec = wfdb.rdrecord(record)
    except FileNotFoundError as e:
        raise DataError(f"{path}: WFDB record incomplete ({e.filename or e})") from None
    except Exception as e:  # wfdb raises bare ValueError/IndexError etc. on malformed headers
        raise DataError(f"{path}: not a readable WFDB record ({type(e).__name__}: {e})") from None
    if rec.p_signal is None:
        raise DataError(f"{path}: WFDB record has no physical signal")
    if abs(float(rec.fs) - SAMPLE_RATE_HZ) > 1e-6:
        raise DataError(f"{path}: sampled at {rec.fs} Hz; expected {SAMPLE_RATE_HZ} Hz (MIMIC-III waveform rate)")
    return rec.p_signal[:, _channels(list(rec.sig_name), str(path))].astype(np.float32)


def read_waveform_csv(path: Path) -> np.ndarray:
    """A CSV export (header with channel names, optional units row) → ``(T, 2)`` PLETH, ABP; ``-`` or empty = gap."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header and samples")
    idx = _channels(rows[0], str(path))
    body = rows[1:]
    if body and not _is_number(body[0][idx[0]]):  # units row, e.g. 'NU','mmHg'
        body = body[1:]
    out = np.full((len(body), 2), np.nan, dtype=np.float32)
    for i, row in enumerate(body):
        for k, j in enumerate(idx):
            cell = row[j].strip().strip("'\"") if j < len(row) else ""
            if cell and cell != "-":
                if not _is_number(cell):
                    raise DataError(f"{path}: line {i + 2}: {cell!r} is not a number")
                out[i, k] = float(cell)
    return out


def _is_number(s: str) -> bool:
    try:
        float(s.strip().strip("'\""))
        return True
    except ValueError:
        return False


def windows_from_signal(signal: np.ndarray) -> np.ndarray:
    """``(T, 2)`` → non-overlapping ``(N, 2, 1024)`` windows; windows containing a gap are dropped."""
    n = len(signal) // WINDOW
    w = signal[: n * WINDOW].reshape(n, WINDOW, 2).transpose(0, 2, 1)
    return w[np.isfinite(w).all(axis=(1, 2))]


def scale_windows(windows: np.ndarray, scaling: str = "global") -> np.ndarray:
    """``global``: ``(x − offset)/scale`` per channel with fixed constants; ``minmax``: each window's channels to [0, 1]."""
    w = np.asarray(windows, dtype=np.float32)
    if scaling == "global":
        off = np.array([WAVE_SCALING[c][0] for c in WAVE_CHANNELS], dtype=np.float32)[:, None]
        sc = np.array([WAVE_SCALING[c][1] for c in WAVE_CHANNELS], dtype=np.float32)[:, None]
        return (w - off) / sc
    if scaling == "minmax":
        lo, hi = w.min(axis=-1, keepdims=True), w.max(axis=-1, keepdims=True)
        return (w - lo) / np.maximum(hi - lo, 1e-6)
    raise ValueError(f"unknown scaling {scaling!r}")


def read_waveforms(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every WFDB record (``*.hea``) and CSV export under ``path`` (or the one file) → raw windows ``(N, 2, 1024)``
    and the index of the record each came from ``(N,)``."""
    if path.is_dir():
        files = sorted(path.rglob("*.hea")) + sorted(path.rglob("*.csv"))
    elif path.is_file() or path.with_suffix(".hea").is_file():
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    if not files:
        raise DataError(f"{path}: no WFDB records (*.hea) or CSV exports found")
    blocks = [windows_from_signal(read_waveform_csv(f) if f.suffix == ".csv" else read_wfdb(f)) for f in files]
    out = np.concatenate(blocks)
    if len(out) < 3:
        raise DataError(f"{path}: only {len(out)} complete {WINDOW}-sample windows; need at least 3")
    return out, np.concatenate([np.full(len(b), k) for k, b in enumerate(blocks)])


def waveform_spec(source: str, scaling: str) -> DataSpec:
    if scaling == "global":
        units = [f"({c} [{u}] − {WAVE_SCALING[c][0]:g}) / {WAVE_SCALING[c][1]:g}" for c, u in zip(WAVE_CHANNELS, WAVE_UNITS)]
        ranges = [(-1.0, 3.0), (-1.5, 3.0)]
    else:
        units = [f"{c} min-max scaled per window" for c in WAVE_CHANNELS]
        ranges = [(0.0, 1.0), (0.0, 1.0)]
    return DataSpec(kind="waveform", shape=(2, WINDOW), feature_names=list(WAVE_CHANNELS), units=units, ranges=ranges, source=source)


def _group_counts(groups: int, val: float, test: float) -> tuple[int, int]:
    return max(1, int(round(groups * val))), max(1, int(round(groups * test)))


def group_units(groups: np.ndarray, val: float = 0.1, test: float = 0.1) -> dict[str, int] | None:
    """Patients (or episodes) per split of :func:`split_by_group` with the same fractions (``None`` when it splits records)."""
    n = len(np.unique(groups))
    if n < 3:
        return None
    n_val, n_test = _group_counts(n, val, test)
    return {"train": n - n_val - n_test, "val": n_val, "test": n_test}


def split_by_group(data: np.ndarray, groups: np.ndarray, seed: int = 0, val: float = 0.1, test: float = 0.1) -> dict[str, np.ndarray]:
    """Split whole patients (or episodes) into train/val/test, so that held-out records come from unseen patients.

    Calibration on held-out patients is what makes the conformal false-positive rate hold on new patients.
    """
    ids = np.unique(groups)
    if len(ids) < 3:
        return split_fixed(data, seed)
    order = np.random.default_rng(seed).permutation(ids)
    n_val, n_test = _group_counts(len(ids), val, test)
    test_ids, val_ids = order[:n_test], order[n_test : n_test + n_val]
    return {"train": data[~np.isin(groups, np.concatenate([test_ids, val_ids]))], "val": data[np.isin(groups, val_ids)],
            "test": data[np.isin(groups, test_ids)]}


# The generated vitals cohort: 1,000 patients × 48 hours (800 patients for training, 100 to calibrate).
DEFAULT_VITALS_PATIENTS = 1000


def _vitals(spec: str, arg: str):  # noqa: ANN202 - returns models.data.Dataset
    from . import Dataset

    if arg:
        values, episode = read_vitals(Path(arg).expanduser())
    else:
        cohort = generate_vitals(DEFAULT_VITALS_PATIENTS, 48, seed=0)
        values, episode = cohort.values, cohort.patient
    filled = impute(values, episode)
    splits = split_by_group(filled.values, episode)
    unseen = split_by_group(filled.unseen, episode)
    splits["train"] = hot_deck(splits["train"], unseen["train"], np.random.default_rng(0))
    measured = split_by_group(np.isfinite(values), episode)
    return Dataset(vitals_spec(spec), splits, known={k: ~v for k, v in unseen.items()}, grouped=True, measured=measured,
                   units=group_units(episode))


# The generated waveform cohort spreads its 8,000 windows over many patients (2 each): the validation
# split (400 patients) calibrates the anomaly threshold, and a threshold learnt from few patients
# does not carry over to new ones (20 patients × 20 windows gave a 9.2% false-positive rate at a
# 1% target; docs/benchmarks.md).
DEFAULT_WAVE_PATIENTS = 4000


def _waveform(scaling: str):  # noqa: ANN202
    def load(spec: str, arg: str):  # noqa: ANN202 - returns models.data.Dataset
        from . import Dataset

        if arg:
            raw, groups = read_waveforms(Path(arg).expanduser())
        else:
            cohort = generate_waveforms(DEFAULT_WAVE_PATIENTS, 2, seed=0)
            raw, groups = cohort.windows, cohort.patient
        return Dataset(waveform_spec(spec, scaling), split_by_group(scale_windows(raw, scaling), groups), grouped=True,
                       units=group_units(groups))

    return load


LOADERS = {"mimic-vitals": _vitals, "mimic-waveform": _waveform("global"), "mimic-waveform-minmax": _waveform("minmax")}


def write_wfdb(directory: Path, name: str, signal: np.ndarray) -> None:
    """Write ``(T, 2)`` PLETH/ABP as a WFDB record ``directory/name.hea`` + ``.dat`` (format 16)."""
    import wfdb

    wfdb.wrsamp(name, fs=SAMPLE_RATE_HZ, units=list(WAVE_UNITS), sig_name=list(WAVE_CHANNELS), p_signal=signal.astype(np.float64),
                fmt=["16", "16"], adc_gain=[4000.0, 100.0], baseline=[0, 0], write_dir=str(directory))


def write_cohort(out: Path, patients: int = 200, hours: int = 48, windows_per_patient: int = 10, anomaly_fraction: float = 0.1,
                 seed: int = 0, wfdb_records: bool = True) -> dict[str, int]:
    """Write a synthetic cohort in the real formats; returns counts.

    * ``vitals/episodes/<patient>_episode1_timeseries.csv``: normal training episodes (benchmark format);
    * ``vitals/test_records.csv``: a fresh cohort's patient-hours with ``kind`` and planted ``feature`` labels;
    * ``waveforms/train/<patient>.hea|.dat``: normal WFDB records (or ``.csv`` exports with ``wfdb_records=False``);
    * ``waveforms/test_windows.npy`` ``(N, 2, 1024)`` raw windows and ``waveforms/test_labels.csv`` (kind, segment).
    """
    out = Path(out)
    (out / "vitals" / "episodes").mkdir(parents=True, exist_ok=True)
    (out / "waveforms" / "train").mkdir(parents=True, exist_ok=True)
    train = generate_vitals(patients, hours, seed=seed)
    for p in range(patients):
        rows = train.patient == p
        write_timeseries_csv(out / "vitals" / "episodes" / f"{p:05d}_episode1_timeseries.csv", train.hour[rows].astype(float), train.values[rows])
    test = generate_vitals(max(1, patients // 4), hours, seed=seed + 1, anomaly_fraction=anomaly_fraction)
    with (out / "vitals" / "test_records.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", "hour", "kind", "feature", *VITAL_NAMES])
        for i in range(len(test.values)):
            feature = VITAL_NAMES[test.feature[i]] if test.feature[i] >= 0 else ""
            w.writerow([test.patient[i], test.hour[i], test.kind[i], feature, *("" if not np.isfinite(v) else f"{v:g}" for v in test.values[i])])
    waves = generate_waveforms(patients, windows_per_patient, seed=seed + 2)
    for p in range(patients):
        signal = waves.windows[waves.patient == p].transpose(0, 2, 1).reshape(-1, 2)
        if wfdb_records:
            write_wfdb(out / "waveforms" / "train", f"{p:05d}", signal)
        else:
            with (out / "waveforms" / "train" / f"{p:05d}.csv").open("w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["'Elapsed time'", *(f"'{c}'" for c in WAVE_CHANNELS)])
                w.writerow(["'seconds'", *(f"'{u}'" for u in WAVE_UNITS)])
                for k, row in enumerate(signal):
                    w.writerow([f"{k / SAMPLE_RATE_HZ:.3f}", f"{row[0]:.4f}", f"{row[1]:.3f}"])
    test_w = generate_waveforms(max(1, patients // 4), windows_per_patient, seed=seed + 3, anomaly_fraction=anomaly_fraction)
    np.save(out / "waveforms" / "test_windows.npy", test_w.windows)
    with (out / "waveforms" / "test_labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["window", "patient", "kind", "start", "end"])
        for i in range(len(test_w.windows)):
            w.writerow([i, test_w.patient[i], test_w.kind[i], *test_w.segment[i]])
    (out / "SYNTHETIC.txt").write_text(
        "Generated by `flowserve generate-cohort` (models/data/cohort.py). Synthetic records of MIMIC-III shape;\n"
        "no patient data. Vitals: MIMIC-III benchmark timeseries format. Waveforms: PLETH/ABP, 125 Hz.\n")
    return {"vital_rows": int(len(train.values)), "test_vital_rows": int(len(test.values)),
            "waveform_windows": int(len(waves.windows)), "test_windows": int(len(test_w.windows))}
