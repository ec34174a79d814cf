"""Calibrated anomaly scores from a flow's negative log-likelihood.

Score ``s(x) = −log p(x)`` in nats per record (higher = more anomalous). At training end a
held-out set of normal records (the validation split) is scored and its scores stored in the
artifact. For a new record with score ``s`` and calibration scores ``c_1..c_n``:

* ``percentile = 100 · #{c_i ≤ s} / n``;
* conformal p-value ``p = (1 + #{c_i ≥ s}) / (n + 1)`` (valid when the new record is exchangeable
  with the calibration records, i.e. normal);
* ``is_anomaly = p ≤ α`` for a target false-positive rate ``α``; equivalently ``s`` is above the
  threshold ``c_(k)``, ``k = ⌈(n + 1)(1 − α)⌉`` (no threshold, never anomalous, when ``k > n``).

``statistic="typicality"`` replaces ``s`` by ``|s − s̄|`` (``s̄`` the mean calibration score), the
typicality test of Nalisnick et al. (2019): flows can give some out-of-distribution inputs a
*higher* likelihood than normal data, and a two-sided statistic flags those too. The same
conformal machinery applies to ``|c_i − s̄|``.

``statistic="conditional"`` (records) is ``s(x) − β·[1, a(x)]``: the NLL minus its expected value
given which point masses ("atoms") the record sits on. ``a(x)`` are indicators ``x_j = v_j`` for
each feature whose most common calibration value ``v_j`` holds at least 5% of the records (room
air FiO2 0.21, a normal-value fill, the usual Glasgow scores), and ``β`` is the least-squares fit
of the calibration NLLs on them. A flow gives a point mass a tall density spike, so whether a
record sits on FiO2 = 0.21 moves its NLL by several nats, which has nothing to do with anomalies
and hides soft ones such as hypotension (AUROC 0.84 → 0.95; ``docs/benchmarks.md``). It is a
likelihood ratio against a background that knows only the atom pattern (Ren et al. 2019's idea
with the simplest background), one-sided, calibrated conformally like the others.

Each model stores the statistic its requests get by default (``anomaly_statistic`` in the
training config): ``conditional`` for the vitals, ``typicality`` for the waveforms, where damped
ABP is more likely than normal windows.

Records with integer-valued features (e.g. the Glasgow coma scale) are scored at the middle of
each integer's unit bin (dequantization noise 0.5, the midpoint rule for ``log P(bin)``), in
calibration and in use alike: a random draw would add noise to every score.

The calibration also stores, for records, per-feature medians (``fill``, for the median-fill
option), reference quantiles (``reference``, for :mod:`models.anomaly.attribution`), and what scoring
records with absent features needs (:mod:`models.anomaly.marginal`): the importance-sampling proposal
fitted on the training records (``proposal``), and the calibration records themselves
(``records``, at most :data:`MAX_PATTERN_RECORDS`, with ``known``: which of their cells are
measurements or carried-forward measurements rather than a never-measured default). A record that
arrives with only some features is compared with the calibration records masked to the same
pattern and scored by the same estimator (:func:`pattern_calibration`).

Resolution: with ``n`` calibration records the smallest p-value is ``1/(n + 1)``; below
:data:`FEW_CALIBRATION` records training warns, and the manifest and the route report it.

This module holds what scoring needs (numpy only: the service's front-ends import it);
:mod:`models.anomaly.calibration` builds the calibrations from a model and records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..artifacts.manifest import Calibration

if TYPE_CHECKING:  # torch stays out of the service's HTTP front-ends, which score through executors
    from ..density import DensityModel
    from ..spec import DataSpec

MAX_CALIBRATION = 5000
MAX_PATTERN_RECORDS = 1000  # calibration records re-scored per missingness pattern
FEW_CALIBRATION = 100  # below this, p-values are coarse (resolution 1/(n + 1)) and training warns
BIN_MIDPOINT = 0.5
STATISTICS = ("nll", "typicality", "conditional")
ATOM_SHARE = 0.05


def scoring_noise(spec: DataSpec, n: int) -> np.ndarray | None:
    """Dequantization noise for anomaly scoring: bin midpoints ``(n, *shape)`` float32, or ``None`` for continuous
    data. The library (:func:`model_scorer`) and the service's anomaly route both score with it."""
    if not spec.dequantized:
        return None
    return np.full((n, *spec.shape), BIN_MIDPOINT, dtype=np.float32)


def find_atoms(normal: np.ndarray, share: float = ATOM_SHARE) -> list[tuple[int, float]]:
    """``(feature, value)`` for each feature of ``normal (N, D)`` whose most common value holds ≥ ``share`` of the records."""
    atoms = []
    for j in range(normal.shape[1]):
        values, counts = np.unique(np.asarray(normal[:, j], dtype=np.float32), return_counts=True)
        k = int(np.argmax(counts))
        if counts[k] >= share * len(normal):
            atoms.append((j, float(values[k])))
    return atoms


def atom_design(x: np.ndarray, atoms: list[tuple[int, float]] | list[list[float]]) -> np.ndarray:
    """``(N, 1 + A)``: a constant and one indicator per atom (exact float32 equality)."""
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    cols = [np.ones(len(x))] + [(x[:, int(j)] == np.float32(v)).astype(np.float64) for j, v in atoms]
    return np.stack(cols, 1)


def sorted_sample(s: np.ndarray) -> np.ndarray:
    """``s`` sorted; beyond :data:`MAX_CALIBRATION` values, that many evenly spaced order statistics of it."""
    s = np.sort(s)
    if len(s) > MAX_CALIBRATION:  # keep evenly spaced order statistics
        s = s[np.linspace(0, len(s) - 1, MAX_CALIBRATION).round().astype(int)]
    return s


def model_scorer(model: DensityModel, batch_size: int = 4096):  # noqa: ANN201 - Callable[[rows, noise], log p]
    """``score(rows, noise) -> log p (rows,)`` float64 nats, for numpy rows through ``model`` in batches."""
    import torch

    def score(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                x = torch.from_numpy(np.ascontiguousarray(rows[i : i + batch_size], dtype=np.float32))
                nz = scoring_noise(model.spec, len(x)) if noise is None else noise[i : i + batch_size]
                nz = None if nz is None else torch.from_numpy(np.ascontiguousarray(nz, dtype=np.float32))
                out.append(model.log_prob(x, nz).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    return score


def pattern_calibration(calibration: Calibration, pattern: tuple[int, ...], nll: np.ndarray, records: np.ndarray,
                        samples: int | None = None) -> Calibration:
    """The calibration for one missingness pattern: ``nll (n,)`` are the marginal NLLs of the calibration
    ``records (n, D)`` masked to ``pattern`` (the observed features), scored as requests of that pattern are.

    The statistic, atoms (those among the observed features) and their least-squares effects are
    refitted on these scores, so a p-value compares like with like. ``samples``: the K of the marginal
    likelihood that scored them.
    """
    nll = np.asarray(nll, dtype=np.float64)
    if not np.isfinite(nll).all():
        raise ValueError("pattern calibration scores contain non-finite values")
    observed = set(pattern)
    cal = Calibration(score="marginal_nll_nats", statistic=calibration.statistic, split=calibration.split, n=len(nll),
                      mean=float(nll.mean()), scores=sorted_sample(nll).tolist(), pattern=list(pattern), samples=samples,
                      units=None if calibration.units is None else int(min(calibration.units, len(nll))))
    if calibration.atoms is not None:
        atoms = [(int(j), float(v)) for j, v in calibration.atoms if int(j) in observed]
        design = atom_design(records, atoms)
        beta = np.linalg.lstsq(design, nll, rcond=None)[0]
        cal.atoms, cal.atom_effects, cal.conditional_scores = atoms, beta.tolist(), sorted_sample(nll - design @ beta).tolist()
    return cal


def pattern_records(calibration: Calibration, pattern: tuple[int, ...]) -> np.ndarray:
    """Indices of the calibration records usable for ``pattern``: those whose cells in it are all known."""
    known = np.asarray(calibration.known, dtype=bool)
    return np.flatnonzero(known[:, list(pattern)].all(1)) if len(pattern) else np.arange(len(known))


@dataclass
class Assessment:
    """One record's anomaly assessment against a calibration (:meth:`AnomalyScorer.assess`).

    ``p_value`` is the conformal ``(1 + #{c_i ≥ s})/(n + 1)`` of the ``statistic`` ``s`` among the
    ``calibration_n`` calibration scores; ``is_anomaly`` is ``p_value ≤ target_fpr``, and ``threshold``
    the statistic above which that holds (``None`` when no statistic reaches it).
    """

    nll: float  # nats, of the record (of its observed features, for a marginal likelihood)
    nll_per_dim: float  # nats per scored dimension
    percentile: float  # of the NLL among the calibration scores, 0..100
    statistic: str  # nll, typicality or conditional
    p_value: float
    is_anomaly: bool
    threshold: float | None
    calibration_n: int  # calibration scores the p-value compares with
    attribution: list[dict] | None = None  # nats of the statistic that disappear when a part is made typical, largest first
    absent: list[str] | None = None  # record features the request did not send
    imputed: list[str] | None = None  # of those, the ones filled with calibration medians (missing="median")

    @property
    def p_value_resolution(self) -> float:
        """The smallest possible p-value, ``1/(calibration_n + 1)``."""
        return 1.0 / (self.calibration_n + 1)


class AnomalyScorer:
    """Turns NLL scores into percentiles, conformal p-values and decisions.

    ``statistic=None`` in any method means the calibration's default (``nll`` for calibrations
    written before the default was stored). The ``conditional`` statistic also needs the records
    ``x (N, D)`` (their atom indicators).
    """

    def __init__(self, calibration: Calibration) -> None:
        self.calibration = calibration  # what it was built from (a pattern's travels from the executor to the front-ends)
        self.scores = np.asarray(calibration.scores, dtype=np.float64)
        self.n = len(self.scores)
        self.units = self.n if calibration.units is None else int(min(calibration.units, self.n))  # independent units (patients)
        self.mean = float(self.scores.mean() if calibration.mean is None else calibration.mean)
        self.typical = np.sort(np.abs(self.scores - self.mean))
        self.default = calibration.statistic
        self.atoms = calibration.atoms
        self.atom_effects = np.asarray(calibration.atom_effects or [], dtype=np.float64)
        self.conditional = np.asarray(calibration.conditional_scores or [], dtype=np.float64)

    def resolve(self, statistic: str | None) -> str:
        statistic = statistic or self.default
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; use one of {STATISTICS}")
        if statistic == "conditional" and self.atoms is None:
            raise ValueError("statistic 'conditional' needs a record model calibrated with atoms; use 'nll' or 'typicality'")
        return statistic

    def _reference(self, statistic: str) -> np.ndarray:
        return {"nll": self.scores, "typicality": self.typical, "conditional": self.conditional}[statistic]

    def statistic(self, nll: np.ndarray, statistic: str | None = None, x: np.ndarray | None = None) -> np.ndarray:
        """The chosen statistic of NLLs ``(N,)`` (nats); ``x`` the records, for ``conditional``."""
        statistic = self.resolve(statistic)
        nll = np.asarray(nll, dtype=np.float64)
        if statistic == "nll":
            return nll
        if statistic == "typicality":
            return np.abs(nll - self.mean)
        if x is None:
            raise ValueError("the conditional statistic needs the records")
        return nll - atom_design(x, self.atoms) @ self.atom_effects

    def threshold(self, target_fpr: float, statistic: str | None = None) -> float:
        """Statistic above which a record is flagged at false-positive rate ``target_fpr`` (``inf`` if none)."""
        ref = self._reference(self.resolve(statistic))
        k = math.ceil((len(ref) + 1) * (1 - target_fpr))
        return float(ref[k - 1]) if 1 <= k <= len(ref) else math.inf

    def p_values(self, nll: np.ndarray, statistic: str | None = None, x: np.ndarray | None = None) -> np.ndarray:
        """Conformal p-values ``(1 + #{c_i ≥ s})/(n + 1)`` of the chosen statistic."""
        statistic = self.resolve(statistic)
        ref = self._reference(statistic)
        return (1 + len(ref) - np.searchsorted(ref, self.statistic(nll, statistic, x), side="left")) / (len(ref) + 1)

    def assess(self, nll: np.ndarray, dims: int, target_fpr: float = 0.01, statistic: str | None = None,
               x: np.ndarray | None = None) -> list[Assessment]:
        """One :class:`Assessment` per record of ``nll (N,)`` (nats) over ``dims`` scored dimensions."""
        statistic = self.resolve(statistic)
        nll = np.asarray(nll, dtype=np.float64)
        below = np.searchsorted(self.scores, nll, side="right")  # #{c ≤ s}
        p = self.p_values(nll, statistic, x)
        thr = self.threshold(target_fpr, statistic)
        return [Assessment(nll=float(s), nll_per_dim=float(s / dims), percentile=float(100 * b / self.n), statistic=statistic,
                           p_value=float(pv), is_anomaly=bool(pv <= target_fpr), threshold=thr if math.isfinite(thr) else None,
                           calibration_n=self.n)
                for s, b, pv in zip(nll, below, p)]


