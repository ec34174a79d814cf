"""Marginal likelihood of the observed features of a record, by importance sampling over the absent ones.

A record arrives with features ``o`` observed and ``m`` absent. Its score is ``−log p(x_o)``, nats
per record, with

    p(x_o) = ∫ p(x_o, x_m) dx_m = E_{q(x_m | x_o)} [ p(x_o, x_m) / q(x_m | x_o) ],

estimated with ``K`` draws ``x_m^(k) ~ q`` scored by the flow in one batch:

    log p̂(x_o) = logsumexp_k [ log p(x_o, x_m^(k)) − log q(x_m^(k) | x_o) ] − log K.

``p̂`` is unbiased for ``p(x_o)``; ``log p̂`` is biased low by about ``Var(w)/(2K)`` (``w`` the
normalised weights), and consistent as ``K → ∞``. With nothing absent it is the flow's exact
log-density (one row, no sampling).

**Proposal.** ``q(x_m | x_o)`` is the conditional of a multivariate Student-t (``ν = 5``) whose
location and scale are the mean and covariance of the training records, in closed form from one
Cholesky factor per missingness pattern: ``μ_{m|o} = μ_m + Σ_mo Σ_oo⁻¹ (x_o − μ_o)``, scale
``(ν + δ²)/(ν + |o|) · (Σ_mm − Σ_mo Σ_oo⁻¹ Σ_om)`` with ``δ²`` the Mahalanobis distance of ``x_o``,
``ν + |o|`` degrees of freedom. It carries the linear couplings between features (blood pressures,
the Glasgow components), and its tails are heavier than the flow's (polynomial vs Gaussian), so
the weights stay bounded. Samples from the flow itself would follow its non-linear structure
better, but a flow samples the joint, not a conditional; the conditional would need MCMC.

**Discrete features** (``spec.discrete_features``). The flow's likelihood of an integer value is
the density integrated over its unit bin (uniform dequantization). An absent discrete feature is
drawn as a continuous value in the dequantized space (the proposal is fitted on bin centres
``x + ½``) and scored with zero dequantization noise, so the importance sum integrates the density
over all bins at once. Observed discrete features are scored at their bin midpoints, as in the
anomaly calibration.

**Determinism.** The draws for a pattern come from a seed fixed by the pattern, so the same record
always gets the same score, and calibration records masked to that pattern are scored with the
same draws (common random numbers), which is what the conformal p-value compares.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .scoring import BIN_MIDPOINT
from ..logspace import log_mean_exp

DEFAULT_SAMPLES = 32  # importance samples K per record; the service's default too (FLOWSERVE_ANOMALY_SAMPLES)
STUDENT_DF = 5.0

Pattern = tuple[int, ...]  # indices of the observed features, ascending


def pattern_of(observed: np.ndarray) -> Pattern:
    """``(D,)`` bool mask of observed features → the sorted tuple of their indices."""
    return tuple(int(j) for j in np.flatnonzero(observed))


def pattern_seed(pattern: Pattern, d: int) -> int:
    """A seed fixed by the pattern (so every record of a pattern gets the same draws)."""
    return int.from_bytes(hashlib.sha256(f"{d}:{','.join(map(str, pattern))}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class GaussianFit:
    """Location ``mean (D,)`` and scale ``cov (D, D)`` of the dequantized training records.

    Discrete features enter as ``x + u``, ``u ~ U(0, 1)``: mean at the bin centre, variance + 1/12.
    Without the 1/12 a feature that is a sum of others (the Glasgow total) would get a conditional
    scale of zero, while the flow spreads it over its whole unit bin.
    """

    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, discrete: list[int] | None = None, ridge: float = 1e-4) -> GaussianFit:
        """Fit on records ``x (N, D)``; ``ridge`` × each variance is added to the diagonal (atoms make Σ near-singular)."""
        x = np.asarray(x, dtype=np.float64).copy()
        d = x.shape[1]
        dequant = np.zeros(d)
        if discrete:
            x[:, discrete] += BIN_MIDPOINT
            dequant[discrete] = 1.0 / 12.0  # variance of the U(0, 1) dequantization noise
        mean = x.mean(0)
        cov = np.cov(x, rowvar=False).reshape(d, d) + np.diag(dequant)
        cov = cov + np.diag(ridge * np.maximum(np.diag(cov), 1e-12) + 1e-12)
        return cls(mean, cov)

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "cov": self.cov.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> GaussianFit:
        return cls(np.asarray(d["mean"], dtype=np.float64), np.asarray(d["cov"], dtype=np.float64))


@dataclass(frozen=True)
class Spike:
    """A point mass of continuous feature ``feature`` at ``value`` that the flow learnt as a narrow spike of
    width ``scale`` (standard deviation of the Gaussian proposal component); ``share`` of training records sit on it."""

    feature: int
    value: float
    scale: float
    share: float


def find_spikes(score: Callable[[np.ndarray, np.ndarray | None], np.ndarray], train: np.ndarray, discrete: list[int] | None,
                atoms: list[tuple[int, float]], probe_records: int = 64) -> list[Spike]:
    """Measure the width of the flow's density spike at each continuous atom ``(feature, value)``.

    For up to ``probe_records`` training records on the atom, the log-density is evaluated with the
    feature moved by ``±δ`` on a geometric grid (10⁻⁷…1 feature standard deviations); the
    half-width at half-maximum is the smallest ``δ`` where it has dropped by ``log 2`` (median over
    records and both sides). An atom whose density is still at half-maximum at 0.05 standard
    deviations is no spike (the diffuse proposal covers it) and is left out.
    """
    train = np.asarray(train, dtype=np.float32)
    d = train.shape[1]
    noise = np.zeros(d, dtype=np.float32)
    if discrete:
        noise[discrete] = BIN_MIDPOINT
    grid = np.geomspace(1e-7, 1.0, 36)
    out = []
    for j, v in atoms:
        if discrete and j in discrete:
            continue
        on = train[train[:, j] == np.float32(v)][:probe_records]
        sd = float(train[:, j].std())
        if len(on) < 8 or sd <= 0:
            continue
        widths = []
        for sign in (-1.0, 1.0):
            rows = np.repeat(on[:, None, :], len(grid) + 1, 1)
            rows[:, 1:, j] = np.float32(v) + np.float32(sign * sd) * grid.astype(np.float32)
            lp = score(rows.reshape(-1, d), np.broadcast_to(noise, (rows.shape[0] * rows.shape[1], d)).copy()).reshape(len(on), -1)
            drop = lp[:, :1] - lp[:, 1:] > math.log(2)
            first = np.where(drop.any(1), drop.argmax(1), len(grid) - 1)
            widths.append(np.median(grid[first]) * sd)
        hwhm = float(np.mean(widths))
        if hwhm < 0.05 * sd:
            out.append(Spike(int(j), float(v), hwhm / math.sqrt(2 * math.log(2)), float(np.mean(train[:, j] == np.float32(v)))))
    return out


@dataclass(frozen=True)
class Proposal:
    """What the proposal is built from: the training records' :class:`GaussianFit` and the flow's :class:`Spike` s."""

    fit: GaussianFit
    spikes: tuple[Spike, ...] = ()

    def to_dict(self) -> dict:
        return {**self.fit.to_dict(), "df": STUDENT_DF, "spikes": [[s.feature, s.value, s.scale, s.share] for s in self.spikes]}

    @classmethod
    def from_dict(cls, d: dict) -> Proposal:
        return cls(GaussianFit.from_dict(d), tuple(Spike(int(f), float(v), float(sc), float(sh)) for f, v, sc, sh in d.get("spikes", [])))


MAX_SPIKES = 4  # spike components per pattern (the most common absent atoms): 2^4 mixture terms at most


def _t_log_density(dev: np.ndarray, chol: np.ndarray, scale: np.ndarray, dof: float) -> np.ndarray:
    """Multivariate t log-density of deviations ``dev (N, K, k)`` with shape matrix ``scale² · L Lᵀ`` (``scale (N,)``)."""
    k = dev.shape[-1]
    if k == 0:
        return np.zeros(dev.shape[:2])
    white = np.linalg.solve(chol, (dev / scale[:, None, None]).reshape(-1, k).T).T.reshape(dev.shape)
    maha = (white**2).sum(-1)
    log_det = np.log(np.diag(chol)).sum() + k * np.log(scale)
    const = math.lgamma((dof + k) / 2) - math.lgamma(dof / 2) - 0.5 * k * math.log(dof * math.pi)
    return const - log_det[:, None] - 0.5 * (dof + k) * np.log1p(maha / dof)


@dataclass(frozen=True)
class Conditional:
    """``q(x_m | x_o)`` for one pattern: a defensive mixture of the conditional t and the flow's spikes.

    Each absent feature j with a spike is, with probability ``π_j`` (its training share, clipped to
    0.1…0.9), drawn from ``N(v_j, s_j²)`` instead of from the t, whose other coordinates keep their
    joint (marginal) t. The density sums the ``2^J`` mixture components exactly.
    """

    observed: np.ndarray  # (o,) indices
    missing: np.ndarray  # (m,) indices
    mean: np.ndarray  # (D,)
    a: np.ndarray  # (m, o) regression Σ_mo Σ_oo⁻¹
    cond: np.ndarray  # (m, m) conditional scale matrix
    l_cond: np.ndarray  # (m, m) its Cholesky factor
    l_oo: np.ndarray  # (o, o) Cholesky factor of Σ_oo (for δ²)
    spikes: tuple[Spike, ...]  # the absent spikes used here
    spike_pos: np.ndarray  # (J,) their positions within `missing`
    df: float

    @classmethod
    def of(cls, proposal: Proposal | GaussianFit, pattern: Pattern, df: float = STUDENT_DF) -> Conditional:
        if isinstance(proposal, GaussianFit):
            proposal = Proposal(proposal)
        fit = proposal.fit
        d = len(fit.mean)
        o = np.asarray(pattern, dtype=int)
        m = np.setdiff1d(np.arange(d), o)
        s = fit.cov
        if len(o):
            l_oo = np.linalg.cholesky(s[np.ix_(o, o)])
            a = np.linalg.solve(s[np.ix_(o, o)], s[np.ix_(o, m)]).T
            cond = s[np.ix_(m, m)] - a @ s[np.ix_(o, m)]
        else:
            l_oo, a, cond = np.zeros((0, 0)), np.zeros((len(m), 0)), s[np.ix_(m, m)].copy()
        cond = 0.5 * (cond + cond.T) + np.eye(len(m)) * 1e-12 * max(1.0, float(np.abs(np.diag(cond)).max(initial=1.0)))
        absent = set(m.tolist())
        spikes = tuple(sorted((sp for sp in proposal.spikes if sp.feature in absent), key=lambda sp: -sp.share)[:MAX_SPIKES])
        pos = np.array([int(np.flatnonzero(m == sp.feature)[0]) for sp in spikes], dtype=int)
        return cls(o, m, fit.mean, a, cond, np.linalg.cholesky(cond), l_oo, spikes, pos, df)

    @property
    def dof(self) -> float:
        return self.df + len(self.observed)

    def draw(self, x: np.ndarray, draws: Draws) -> tuple[np.ndarray, np.ndarray]:
        """Records ``x (N, D)`` and the pattern's :class:`Draws` → ``x_m (N, K, m)`` and ``log q (N, K)``."""
        o, m = self.observed, self.missing
        dev_o = np.asarray(x, dtype=np.float64)[:, o] - self.mean[o]
        delta2 = (np.linalg.solve(self.l_oo, dev_o.T).T ** 2).sum(1) if len(o) else np.zeros(len(x))
        scale = np.sqrt((self.df + delta2) / self.dof)  # (N,)
        loc = self.mean[m] + dev_o @ self.a.T  # (N, m)
        y = draws.eps @ self.l_cond.T / np.sqrt(draws.chi)[:, None]  # (K, m)
        xm = loc[:, None, :] + scale[:, None, None] * y[None]
        if not self.spikes:
            return xm, _t_log_density(xm - loc[:, None, :], self.l_cond, scale, self.dof)
        v = np.array([sp.value for sp in self.spikes])
        sd = np.array([sp.scale for sp in self.spikes])
        pi = np.clip([sp.share for sp in self.spikes], 0.1, 0.9)
        on = draws.u < pi  # (K, J)
        spike_val = v + sd * draws.eta  # (K, J)
        for t, p in enumerate(self.spike_pos):
            xm[:, on[:, t], p] = spike_val[on[:, t], t]
        dev = xm - loc[:, None, :]
        log_n = -0.5 * ((xm[..., self.spike_pos] - v) / sd) ** 2 - np.log(sd) - 0.5 * math.log(2 * math.pi)  # (N, K, J)
        terms = []
        for bits in range(1 << len(self.spikes)):
            sel = np.array([(bits >> t) & 1 for t in range(len(self.spikes))], dtype=bool)
            keep = np.setdiff1d(np.arange(len(m)), self.spike_pos[sel])
            lt = _t_log_density(dev[..., keep], np.linalg.cholesky(self.cond[np.ix_(keep, keep)]), scale, self.dof)
            terms.append(np.log(np.where(sel, pi, 1 - pi)).sum() + lt + log_n[..., sel].sum(-1))
        return xm, np.logaddexp.reduce(np.stack(terms), axis=0)


@dataclass(frozen=True)
class Draws:
    """A pattern's fixed standard draws: ``eps (K, m)`` N(0, 1), ``chi (K,)`` χ²_dof/dof; for spikes ``u``, ``eta (K, J)``."""

    eps: np.ndarray
    chi: np.ndarray
    u: np.ndarray
    eta: np.ndarray

    @classmethod
    def of(cls, pattern: Pattern, d: int, cond: Conditional, samples: int) -> Draws:
        rng = np.random.default_rng(pattern_seed(pattern, d))
        j = len(cond.spikes)
        return cls(rng.standard_normal((samples, len(cond.missing))), rng.chisquare(cond.dof, samples) / cond.dof,
                   rng.random((samples, j)), rng.standard_normal((samples, j)))


@dataclass(frozen=True)
class MarginalPlan:
    """Rows for the flow and what :meth:`combine` needs to turn their log-densities into ``log p̂(x_o)``."""

    rows: np.ndarray  # (N·K, D) float32
    noise: np.ndarray | None  # (N·K, D) float32 dequantization noise, or None for continuous records
    log_q: np.ndarray  # (N, K) float64
    samples: int

    def combine(self, log_p_rows: np.ndarray) -> np.ndarray:
        """Log-densities of :attr:`rows` ``(N·K,)`` → ``log p̂(x_o) (N,)`` in nats (float64 log-sum-exp)."""
        lw = np.asarray(log_p_rows, dtype=np.float64).reshape(self.log_q.shape) - self.log_q
        return log_mean_exp(np.where(np.isnan(lw), -np.inf, lw), axis=1)  # a draw the flow cannot score has no weight


def plan(x: np.ndarray, pattern: Pattern, proposal: Proposal, discrete: list[int] | None, samples: int = DEFAULT_SAMPLES,
         conditional: Conditional | None = None) -> MarginalPlan:
    """Rows to score for records ``x (N, D)`` that all share ``pattern``; absent entries of ``x`` are ignored.

    With nothing absent: one row per record (``K = 1``, ``log q = 0``), the exact log-density.
    """
    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    disc = np.zeros(d, dtype=bool)
    if discrete:
        disc[discrete] = True
    observed = np.zeros(d, dtype=bool)
    observed[list(pattern)] = True
    base_noise = np.where(disc & observed, BIN_MIDPOINT, 0.0).astype(np.float32)
    if observed.all():
        x_filled = np.nan_to_num(x).astype(np.float32)
        noise = np.broadcast_to(base_noise, x.shape).copy() if discrete else None
        return MarginalPlan(x_filled, noise, np.zeros((n, 1)), 1)
    cond = conditional or Conditional.of(proposal, pattern)
    xm, log_q = cond.draw(np.nan_to_num(x), Draws.of(pattern, d, cond, samples))
    rows = np.repeat(np.nan_to_num(x)[:, None, :], samples, 1)
    rows[:, :, cond.missing] = xm
    noise = np.broadcast_to(base_noise, (n * samples, d)).copy() if discrete else None
    return MarginalPlan(rows.reshape(n * samples, d).astype(np.float32), noise, log_q, samples)


def log_marginal(score: Callable[[np.ndarray, np.ndarray | None], np.ndarray], x: np.ndarray, observed: np.ndarray,
                 proposal: Proposal, discrete: list[int] | None, samples: int = DEFAULT_SAMPLES) -> np.ndarray:
    """``log p̂(x_o)`` (nats, ``(N,)``) for records ``x (N, D)`` with ``observed (N, D)`` masks, any mix of patterns.

    ``score(rows, noise) -> log p (rows,)`` is the flow (e.g. ``model.log_prob`` on numpy).
    """
    observed = np.asarray(observed, dtype=bool)
    out = np.empty(len(x))
    groups: dict[Pattern, list[int]] = {}
    for i, row in enumerate(observed):
        groups.setdefault(pattern_of(row), []).append(i)
    for pattern, idx in groups.items():
        p = plan(x[idx], pattern, proposal, discrete, samples)
        out[idx] = p.combine(score(p.rows, p.noise))
    return out
