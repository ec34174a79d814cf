"""Building anomaly calibrations from a trained model and normal records (what :mod:`models.anomaly.scoring` scores with).

:func:`calibrate` scores held-out normal records and returns the manifest's ``calibration``:
sorted scores, the atom fit of the conditional statistic, per-feature medians and reference
values for attribution, and, for records, what absent features need (:func:`record_calibration`:
the importance-sampling proposal and a sample of calibration records) with the most frequent
missingness patterns calibrated in advance (:mod:`models.anomaly.missing`). :func:`recalibrate` does it
again for an artifact on disk (``flowserve calibrate``).

Above :mod:`models.anomaly.scoring`, :mod:`models.anomaly.marginal` and :mod:`models.anomaly.missing`, which import
nothing from here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..artifacts import store as artifact
from ..artifacts.manifest import Calibration
from ..data import load_dataset
from ..errors import DataError
from .attribution import group_reference, reference_values
from .marginal import GaussianFit, Proposal, find_spikes
from .missing import Score, calibrate_patterns, frequent_patterns
from .scoring import FEW_CALIBRATION, MAX_PATTERN_RECORDS, STATISTICS, atom_design, find_atoms, model_scorer, sorted_sample

if TYPE_CHECKING:
    from ..density import DensityModel

log = logging.getLogger(__name__)


def group_references(spec, normal: np.ndarray) -> dict[str, list[list[float]]]:  # noqa: ANN001 - DataSpec
    """Joint reference tuples ``(M, g)`` per feature group of the schema (:func:`models.anomaly.attribution.group_reference`)."""
    names = spec.feature_names or []
    return {g: group_reference(normal, [names.index(f) for f in feats]).tolist() for g, feats in (spec.feature_groups or {}).items()}


def record_calibration(model: DensityModel, normal: np.ndarray, train: np.ndarray, known: np.ndarray | None = None,
                       seed: int = 0, score: Score | None = None) -> dict:
    """What scoring records with absent features needs: the proposal and a sample of calibration records.

    ``normal (N, D)`` held-out normal records, ``train (M, D)`` training records (the proposal's
    fit), ``known (N, D)`` which cells of ``normal`` were measured (or carried forward from a
    measurement), all true when omitted. ``score``: log p of rows through ``model`` (default
    :func:`~models.anomaly.scoring.model_scorer`; a data-parallel job passes one sharded over its ranks).
    """
    discrete = model.spec.discrete_features
    model.eval()
    spikes = find_spikes(score or model_scorer(model), train, discrete, find_atoms(train))
    proposal = Proposal(GaussianFit.fit(train, discrete), tuple(spikes))
    known = np.ones(normal.shape, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    idx = np.arange(len(normal))
    if len(idx) > MAX_PATTERN_RECORDS:
        idx = np.sort(np.random.default_rng(seed).choice(len(normal), MAX_PATTERN_RECORDS, replace=False))
    return {"proposal": proposal.to_dict(), "records": np.asarray(normal[idx], dtype=np.float32).tolist(),
            "known": known[idx].astype(int).tolist()}


def calibrate(model: DensityModel, normal: np.ndarray, batch_size: int = 1024, statistic: str = "nll",
              train: np.ndarray | None = None, known: np.ndarray | None = None, measured: np.ndarray | None = None,
              units: int | None = None, score: Score | None = None) -> Calibration:
    """Score held-out normal records (or windows); returns the calibration stored in the manifest.

    ``statistic`` (one of :data:`STATISTICS`) is the one requests get unless they name another.
    For records, ``train`` (the training records) adds what absent features need
    (:func:`record_calibration`; ``known`` marks the measured cells of ``normal``), and
    ``measured (M, D)``, which cells the training records measured, the calibrations of their most
    frequent missingness patterns (``patterns``: :func:`models.anomaly.missing.calibrate_patterns`).
    ``units``: the patients (or episodes) the records come from, when several records share one
    (stored as ``units``; the drift detector's guarantee counts them, :mod:`models.anomaly.drift`).
    ``score``: log p of rows through ``model``, for every scoring here (default
    :func:`~models.anomaly.scoring.model_scorer`; a data-parallel job passes one sharded over its ranks,
    :meth:`models.training.distributed.World.sharded`).
    """
    if statistic not in STATISTICS:
        raise ValueError(f"unknown statistic {statistic!r}; use one of {STATISTICS}")
    if statistic == "conditional" and model.spec.kind != "record":
        raise ValueError("the conditional statistic is for record models (point masses of features)")
    model.eval()
    nll = -(score or model_scorer(model, batch_size))(np.asarray(normal, dtype=np.float32), None)
    if not np.isfinite(nll).all():
        raise ValueError("calibration scores contain non-finite values")
    s = sorted_sample(nll)
    cal = {"method": "conformal", "score": "nll_nats", "statistic": statistic, "split": "val", "n": int(len(s)),
           "mean": float(nll.mean()), "scores": s.tolist()}
    if units is not None:
        cal["units"] = int(min(units, len(s)))
    if model.spec.kind == "record":
        cal["fill"] = np.median(normal, axis=0).astype(float).tolist()
        cal["reference"] = reference_values(normal, discrete=model.spec.discrete_features).tolist()
        cal["group_reference"] = group_references(model.spec, normal)
        atoms = find_atoms(normal)
        design = atom_design(normal, atoms)
        beta = np.linalg.lstsq(design, nll, rcond=None)[0]
        cal["atoms"] = [[j, v] for j, v in atoms]
        cal["atom_effects"] = beta.tolist()
        cal["conditional_scores"] = sorted_sample(nll - design @ beta).tolist()
        if train is not None:
            cal.update(record_calibration(model, normal, train, known, score=score))
    cal["p_value_resolution"] = 1.0 / (len(s) + 1)
    out = Calibration.model_validate(cal)
    if model.spec.kind == "record" and train is not None and measured is not None:
        out.patterns = calibrate_patterns(out, model.spec.discrete_features, frequent_patterns(measured),
                                          score or model_scorer(model, batch_size=8192))
    return out


def recalibrate(directory, data: str | None = None, statistic: str | None = None, split: str | None = None) -> dict:  # noqa: ANN001
    """Recalibrate an artifact's anomaly scores in place (weights untouched); returns the new calibration's summary.

    ``data`` (a data spec; default: the training data) supplies the calibration records: its
    validation split when it is the training data, otherwise every record of every split (a
    separate calibration CSV, or a user's own normal population). The proposal for absent
    features is fitted on the training data's training split when it can be loaded, else on the
    calibration records. The schema's groups and derived features are refreshed from the loader
    when it describes the same features.
    """
    directory = Path(directory)
    model = artifact.load(directory)
    manifest = model.manifest
    spec = manifest.data_spec
    if spec.kind not in ("record", "waveform"):
        raise DataError(f"{directory}: anomaly calibration is for record and waveform models, not {spec.kind}")
    trained_on = manifest.metrics.get("data") or spec.source
    same = data is None or data == trained_on
    ds = load_dataset(trained_on if same else data)
    held = manifest.metrics.get("calibration_records")
    if same and held and not ds.grouped and held != len(ds.split("val")):  # the records training held out
        ds = ds.with_held_out(int(held), int(manifest.metrics.get("eval_seed", 0)))
    if ds.spec.shape != spec.shape or (ds.spec.feature_names and spec.feature_names and ds.spec.feature_names != spec.feature_names):
        raise DataError(f"data {data!r} has features {ds.spec.feature_names or ds.spec.shape}; the model expects "
                        f"{spec.feature_names or spec.shape}")
    if same or split:
        names = [split or "val"]
    else:
        names = list(ds.splits)
    normal = np.concatenate([ds.split(n) for n in names])
    known = np.concatenate([ds.known[n] for n in names]) if ds.known else None
    train = measured = None
    if spec.kind == "record":
        try:
            source = ds if same else load_dataset(trained_on)
            train = source.split("train")
            measured = source.measured["train"] if source.measured else None
        except DataError as e:  # the training data may be gone; the proposal then uses the calibration records
            log.warning("training data %r not loadable (%s); fitting the absent-feature proposal on the calibration records", trained_on, e)
            train = normal
    if ds.spec.feature_names == spec.feature_names and ds.spec.shape == spec.shape:
        spec = spec.model_copy(update={"feature_groups": ds.spec.feature_groups, "derived": ds.spec.derived})
        model.spec = spec
    units = sum(ds.units[n] for n in names) if ds.units else None
    cal = calibrate(model, normal, statistic=statistic or (manifest.calibration.statistic if manifest.calibration else "nll"),
                    train=train, known=known, measured=measured, units=units)
    cal.split = ",".join(names) if same else f"{data} ({','.join(names)})"
    if cal.n < FEW_CALIBRATION:
        log.warning("only %d calibration records: p-values have a resolution of 1/%d", cal.n, cal.n + 1)
    artifact.write_manifest(directory, manifest.model_copy(update={"calibration": cal, "data_spec": spec}))
    return {"n": cal.n, "statistic": cal.statistic, "split": cal.split, "p_value_resolution": cal.p_value_resolution,
            "patterns_supported": cal.proposal is not None, "patterns_stored": len(cal.patterns or [])}
