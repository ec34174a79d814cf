"""Sequential drift detection on conformal p-values: a mixture Shiryaev–Roberts procedure whose
false-alarm guarantee holds for the one fixed calibration set the scores are compared with.

**Setting.** A stream sends records ``x_1, x_2, …``. For each, the anomaly route gives a conformal
p-value ``p_t = (1 + #{c_i ≥ s_t}) / (n + 1)`` against ``n`` calibration scores ``c`` (the model's,
or those of the record's missingness pattern; :mod:`models.anomaly.scoring`). Before a change the
records are exchangeable with the calibration records; after it they are not. The detector raises
an alarm when the p-values stop looking like those of normal records, in either direction:

* ``unusual``: small p-values (NLL up: a shifted sensor, a sicker ward, a unit error);
* ``typical``: large p-values (NLL down: a flat-lined or stuck channel, records too typical);
* ``central`` (off by default): p-values bunched in the middle, scores less spread than the
  calibration's (a bet on ``u = (2|k − (n + 2)/2| + 1)/(n + 2)``).

**The law of the p-values given the calibration set.** Write ``k`` for the grid index,
``p = k/(n + 1)``, ``k = 1 … n + 1``. Given the calibration scores, the p-values of pre-change
records are i.i.d. with ``P(k) = D_k``, the probability mass between the ``(k−1)``-th and ``k``-th
largest calibration score. For continuous scores ``(D_1, …, D_{n+1}) ~ Dirichlet(1, …, 1)``
whatever the score distribution (the spacings of ``n`` uniform order statistics). Averaged over
calibration sets ``k`` is uniform; for the one set in use it is not, and the p-values of a stream
are dependent through it. This is why a test martingale built for i.i.d. uniform p-values does not
keep its guarantee as it is.

**Bets.** Component ``j`` bets on one alternative through a function of the grid, normalised to
mean 1 over the uniform grid (``h`` evaluated at ``u = k/(n + 1)``; the ``typical`` side at the
mirrored ``u = (n + 2 − k)/(n + 1)``)::

    g_j(k) = (1 − w_j) + w_j · h_j(u) / mean_k h_j(u),        h_j(u) = κ_j u^(κ_j − 1)

a power bet (``κ`` in (0, 1); smaller bets harder on the extremes) mixed with weight ``w`` with
"no bet" (so that a drift that touches a fraction ``w`` of the records is met by a bet that does
not lose on the rest). Its conditional mean ``m_j = Σ_k g_j(k) D_k`` is a linear function of a
Dirichlet vector: its ``confidence`` quantile ``q_j(n)`` depends on ``n`` only, and is simulated
once per ``n`` (:func:`dirichlet_quantile`). The detector's likelihood ratios are
``Λ_j = g_j / q_j(n)``: with probability ≥ ``confidence`` over the draw of the calibration set,
``E[Λ_j(p_t) | c] ≤ 1``.

**Statistic and guarantee.** Per component the Shiryaev–Roberts recursion
``R_t^j = (1 + R_{t−1}^j) Λ_j(p_t)``, ``R_0 = 0``; the statistic is the mixture
``R_t = Σ_j π_j R_t^j`` (``π`` uniform), and the alarm is ``R_t ≥ A``. Given a calibration set for
which every ``E[Λ_j | c] ≤ 1``, ``R_t − t`` is a supermartingale before the change, so by optional
stopping the run length ``T`` to a false alarm has ``E[T] ≥ E[R_T] ≥ A`` (Pollak 1987, Thm 1, for
one component; the mixture is linear, so it keeps it). Hence: **with probability ≥ ``confidence``
over the calibration set, the expected number of records between false alarms is at least
``A`` (the ERT), for the calibration set in use.** The Shiryaev–Roberts overshoot is small, so the
realised run length is close to ``A``, not a loose bound. The guarantee is for i.i.d. records:
records of one patient close in time are dependent, and a stream that sends them in a burst
raises false alarms sooner (a stream per ward, patients interleaved, is the intended use).

**Calibration records that share a patient.** The Dirichlet law holds when the calibration records
are independent draws. Records of one patient are not: 4,800 patient-hours from 100 patients pin the
score distribution down about as well as 100 draws do, and the p-values of new patients stray from
the grid's uniform law by that much (on the generated vitals, 1.1–2.3% of fresh patients' records
at p ≤ 0.01). The calibration therefore stores ``units``, the patients (or episodes) behind it
(:func:`models.data.mimic.group_units`), and the correction pools the grid into ``units + 1`` blocks
of consecutive cells whose masses are Dirichlet spacings: ``m_j = Σ_b D_b ḡ_j(b)`` with ``ḡ_j(b)``
the mean bet over block ``b``. Calibrations without ``units`` (each record its own draw) use ``n``.

Records with absent features carry their pattern's p-value and ``n`` (the pattern's calibration
records): each record's likelihood ratio is normalised for its own ``n``, so one stream may mix
patterns. Ties (integer-valued features put many calibration records at one score) make the p-value
conservative on the ``unusual`` side and liberal on the ``typical`` side.

Everything is in log space, float64 (``log R`` in nats; the threshold is ``log A``), and one batch
of records is one vectorised update: ``R_t = P_t (R_0 + Σ_{s ≤ t} 1/P_{s−1})`` with
``P_t = Π_{s ≤ t} Λ_s``, computed with ``logaddexp.accumulate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

Side = Literal["unusual", "typical", "central"]
SIDES: tuple[Side, ...] = ("unusual", "typical", "central")
QUANTILE_DRAWS = 2000  # Dirichlet draws behind q_j(n): the quantile's Monte Carlo error is a fraction of a percent of q − 1
QUANTILE_SEED = 20261207


class Bet(BaseModel):
    """One alternative the detector bets on: a power ``κ`` mixed with weight ``w`` (see the module docstring)."""

    power: float = Field(..., gt=0, lt=1, description="κ: smaller bets harder on extreme p-values")
    weight: float = Field(..., gt=0, le=1, description="w: the share of records the alternative is expected to touch")


class DriftConfig(BaseModel):
    """The detector's parameters (the service's ``FLOWSERVE_DRIFT_*`` settings)."""

    ert: float = Field(10_000.0, ge=2, description="A: expected records between false alarms without drift")
    confidence: float = Field(0.95, ge=0.5, lt=1, description="probability over calibration sets that the ERT holds")
    bets: list[Bet] = Field(default_factory=lambda: [Bet(power=0.8, weight=1.0), Bet(power=0.5, weight=0.3), Bet(power=0.1, weight=0.05)],
                            min_length=1, max_length=8, description="alternatives, each used on every side")
    sides: list[Side] = Field(default_factory=lambda: ["unusual", "typical"], min_length=1, description="directions watched")

    @field_validator("sides")
    @classmethod
    def _distinct(cls, value: list[Side]) -> list[Side]:
        if len(set(value)) != len(value):
            raise ValueError("sides must be distinct")
        return value

    @property
    def components(self) -> list[tuple[Side, Bet]]:
        return [(side, bet) for side in self.sides for bet in self.bets]

    @property
    def log_threshold(self) -> float:
        """``log A``, nats."""
        return math.log(self.ert)


def dirichlet_quantile(g: np.ndarray, confidence: float, draws: int = QUANTILE_DRAWS, seed: int = QUANTILE_SEED) -> np.ndarray:
    """The ``confidence`` quantile of ``Σ_k g[k, j] D_k`` over ``D ~ Dirichlet(1, …, 1)``, per column ``j`` of ``g (n + 1, J)``."""
    rng = np.random.default_rng(seed)
    out = []
    chunk = max(1, 2_000_000 // len(g))
    for start in range(0, draws, chunk):
        e = rng.standard_exponential((min(chunk, draws - start), len(g)))
        out.append((e @ g) / e.sum(1, keepdims=True))
    return np.quantile(np.concatenate(out), confidence, axis=0)


@dataclass
class _Grid:
    """The log-likelihood ratios ``log Λ_k(i)`` on the grid of one calibration ``(n, units)``: ``(n + 1, K)``, one column
    per (side, bet)."""

    log_ratio: np.ndarray
    quantile: np.ndarray  # q_k(n, units), (K,)


class DriftFamily:
    """The likelihood ratios of a :class:`DriftConfig`, per calibration ``(n, units)`` (computed once for each)."""

    def __init__(self, config: DriftConfig) -> None:
        self.config = config
        self.components = config.components
        self.log_weights = np.full(len(self.components), -math.log(len(self.components)))
        self.unusual = np.array([side == "unusual" for side, _ in self.components])
        self._grids: dict[tuple[int, int], _Grid] = {}

    def grid(self, n: int, units: int | None = None) -> _Grid:
        """Likelihood ratios for p-values against ``n`` calibration scores from ``units`` independent units
        (patients; default ``n``): the grid's cells are pooled into ``units + 1`` blocks of consecutive cells
        whose masses are the Dirichlet spacings (see the module docstring)."""
        units = n if units is None else max(1, min(int(units), n))
        known = self._grids.get((n, units))
        if known is not None:
            return known
        k = np.arange(1, n + 2, dtype=np.float64)
        cols = []
        for side, bet in self.components:
            if side == "central":  # p-values bunched in the middle: scores less spread than calibration's
                u = (2 * np.abs(k - (n + 2) / 2) + 1) / (n + 2)
            else:
                u = (k if side == "unusual" else n + 2 - k) / (n + 1)
            h = bet.power * u ** (bet.power - 1)
            cols.append((1 - bet.weight) + bet.weight * h / h.mean())
        g = np.stack(cols, 1)
        blocks = g if units == n else np.stack([b.mean(0) for b in np.array_split(g, units + 1)])
        q = np.maximum(dirichlet_quantile(blocks, self.config.confidence), 1.0)
        grid = self._grids[(n, units)] = _Grid(np.log(g / q), q)
        return grid

    def log_ratios(self, p: np.ndarray, n: np.ndarray, units: np.ndarray | None = None) -> np.ndarray:
        """``log Λ (N, J)`` for p-values ``p (N,)`` against ``n (N,)`` calibration scores from ``units (N,)`` independent
        units each (default ``n``)."""
        p = np.asarray(p, dtype=np.float64)
        n = np.asarray(n, dtype=np.int64)
        units = n if units is None else np.asarray(units, dtype=np.int64)
        if not (np.isfinite(p).all() and ((p > 0) & (p <= 1)).all()):
            raise ValueError("p-values must lie in (0, 1]")
        if (n < 1).any() or (units < 1).any():
            raise ValueError("calibration sizes must be positive")
        out = np.empty((len(p), len(self.components)))
        for size, unit in np.unique(np.stack([n, units], 1), axis=0).tolist():  # one grid per calibration (n, units)
            rows = np.flatnonzero((n == size) & (units == unit))
            cell = np.clip(np.ceil(p[rows] * (size + 1) - 1e-9).astype(np.int64), 1, size + 1)
            out[rows] = self.grid(size, unit).log_ratio[cell - 1]
        return out


@dataclass
class DriftState:
    """One stream's detector: ``log R^j`` per component (``-inf`` = 0), records seen, and the first alarm."""

    log_r: np.ndarray
    records: int = 0
    alarm_at: int | None = None  # 1-based index in the stream of the record that raised the alarm (kept until reset)
    peak: float = -math.inf  # the largest log R seen since the last reset

    @classmethod
    def fresh(cls, components: int) -> DriftState:
        return cls(np.full(components, -math.inf))


@dataclass(frozen=True)
class DriftReading:
    """What a stream's detector says after its latest record."""

    records: int
    statistic: float  # log R, nats
    threshold: float  # log A, nats
    alarm: bool  # an alarm was raised since the last reset (it stays raised)
    alarm_at: int | None
    direction: Side | None  # the side whose bets carry most of R (None before any record)
    peak: float


@dataclass
class DriftDetector:
    """The mixture Shiryaev–Roberts detector of one stream. ``update`` takes a batch of records' p-values in stream order."""

    family: DriftFamily
    state: DriftState = field(init=False)

    def __post_init__(self) -> None:
        self.state = DriftState.fresh(len(self.family.components))

    def update(self, p: np.ndarray, n: np.ndarray, units: np.ndarray | None = None) -> DriftReading:
        """Feed p-values ``p (N,)`` against ``n (N,)`` calibration scores from ``units (N,)`` independent units each
        (default ``n``), in stream order; the reading after the last."""
        lr = self.family.log_ratios(p, n, units)  # (N, J)
        if len(lr):
            s = self.state
            cum = np.cumsum(lr, 0)  # log P_t
            before = np.vstack([np.zeros((1, lr.shape[1])), -cum[:-1]])  # −log P_{t−1}
            acc = np.logaddexp.accumulate(before, 0)  # log Σ_{s ≤ t} 1/P_{s−1}
            log_r = cum + np.logaddexp(s.log_r[None, :], acc)  # (N, J)
            mix = np.logaddexp.reduce(log_r + self.family.log_weights, 1)  # (N,)
            if not np.isfinite(mix).all():
                raise FloatingPointError("drift statistic is not finite")
            if s.alarm_at is None:
                over = np.flatnonzero(mix >= self.family.config.log_threshold)
                if len(over):
                    s.alarm_at = s.records + int(over[0]) + 1
            s.peak = max(s.peak, float(mix.max()))
            s.log_r = log_r[-1]
            s.records += len(lr)
        return self.reading()

    def reading(self) -> DriftReading:
        s, fam = self.state, self.family
        weighted = s.log_r + fam.log_weights
        stat = float(np.logaddexp.reduce(weighted))
        direction: Side | None = None
        if s.records:
            up = float(np.logaddexp.reduce(weighted[fam.unusual])) if fam.unusual.any() else -math.inf
            down = float(np.logaddexp.reduce(weighted[~fam.unusual])) if (~fam.unusual).any() else -math.inf
            direction = "unusual" if up >= down else "typical"
        return DriftReading(s.records, stat, fam.config.log_threshold, s.alarm_at is not None, s.alarm_at, direction, s.peak)


def first_alarms(family: DriftFamily, p: np.ndarray, n: int, units: int | None = None) -> np.ndarray:
    """For each stream ``p[r]`` of ``p (R, L)`` (against ``n`` calibration scores from ``units`` independent units), the
    1-based index of the record at which a fresh detector first alarms, or ``L + 1`` when it never does."""
    p = np.asarray(p, dtype=np.float64)
    out = np.empty(len(p), dtype=np.int64)
    for r, row in enumerate(p):
        det = DriftDetector(family)
        det.update(row, np.broadcast_to(np.asarray(n), row.shape), np.broadcast_to(np.asarray(n if units is None else units), row.shape))
        out[r] = len(row) + 1 if det.state.alarm_at is None else det.state.alarm_at
    return out

