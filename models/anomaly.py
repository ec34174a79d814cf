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

Records with integer-valued features (e.g. the Glasgow coma scale) are scored at the middle of
each integer's unit bin (dequantization noise 0.5, the midpoint rule for ``log P(bin)``), in
calibration and in use alike: a random draw would add noise to every score.

The calibration also stores, for records, per-feature medians (``fill``, used to impute missing
features) and reference quantiles (``reference``, for :mod:`models.attribution`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .density import DensityModel

MAX_CALIBRATION = 5000
BIN_MIDPOINT = 0.5


def scoring_noise(model: DensityModel, n: int) -> torch.Tensor | None:
    """Dequantization noise for anomaly scoring: bin midpoints ``(n, *shape)``, or ``None`` for continuous data."""
    if not model.spec.dequantized:
        return None
    return torch.full((n, *model.spec.shape), BIN_MIDPOINT)


def calibrate(model: DensityModel, normal: np.ndarray, batch_size: int = 1024, seed: int = 0) -> dict:
    """Score held-out normal records (or windows); returns the calibration stored in the manifest."""
    model.eval()
    scores = []
    with torch.no_grad():
        for i in range(0, len(normal), batch_size):
            x = torch.from_numpy(np.asarray(normal[i : i + batch_size], dtype=np.float32))
            scores.append(-model.log_prob(x, scoring_noise(model, len(x))).double().numpy())
    s = np.sort(np.concatenate(scores))
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain non-finite values")
    mean = float(s.mean())
    if len(s) > MAX_CALIBRATION:  # keep evenly spaced order statistics
        s = s[np.linspace(0, len(s) - 1, MAX_CALIBRATION).round().astype(int)]
    cal = {"method": "conformal", "score": "nll_nats", "split": "val", "n": int(len(s)), "mean": mean, "scores": s.tolist()}
    if model.spec.kind == "record":
        from .attribution import reference_values

        cal["fill"] = np.median(normal, axis=0).astype(float).tolist()
        cal["reference"] = reference_values(normal, discrete=model.spec.discrete_features).tolist()
    return cal


class AnomalyScorer:
    """Turns NLL scores into percentiles, conformal p-values and decisions."""

    def __init__(self, calibration: dict) -> None:
        self.scores = np.asarray(calibration["scores"], dtype=np.float64)
        self.n = len(self.scores)
        self.mean = float(calibration.get("mean", self.scores.mean()))
        self.typical = np.sort(np.abs(self.scores - self.mean))

    def _reference(self, statistic: str) -> np.ndarray:
        if statistic == "nll":
            return self.scores
        if statistic == "typicality":
            return self.typical
        raise ValueError(f"unknown statistic {statistic!r}; use 'nll' or 'typicality'")

    def statistic(self, nll: np.ndarray, statistic: str = "nll") -> np.ndarray:
        nll = np.asarray(nll, dtype=np.float64)
        return nll if statistic == "nll" else np.abs(nll - self.mean)

    def threshold(self, target_fpr: float, statistic: str = "nll") -> float:
        """Statistic above which a record is flagged at false-positive rate ``target_fpr`` (``inf`` if none)."""
        ref = self._reference(statistic)
        k = math.ceil((self.n + 1) * (1 - target_fpr))
        return float(ref[k - 1]) if 1 <= k <= self.n else math.inf

    def p_values(self, nll: np.ndarray, statistic: str = "nll") -> np.ndarray:
        """Conformal p-values ``(1 + #{c_i ≥ s})/(n + 1)`` of the chosen statistic."""
        ref = self._reference(statistic)
        return (1 + self.n - np.searchsorted(ref, self.statistic(nll, statistic), side="left")) / (self.n + 1)

    def assess(self, nll: np.ndarray, dims: int, target_fpr: float = 0.01, statistic: str = "nll") -> list[dict]:
        """Per record: ``nll`` (nats), ``nll_per_dim``, ``percentile`` (of the NLL), ``p_value``, ``is_anomaly``, ``threshold``."""
        nll = np.asarray(nll, dtype=np.float64)
        below = np.searchsorted(self.scores, nll, side="right")  # #{c ≤ s}
        p = self.p_values(nll, statistic)
        thr = self.threshold(target_fpr, statistic)
        return [
            {"nll": float(s), "nll_per_dim": float(s / dims), "percentile": float(100 * b / self.n), "statistic": statistic,
             "p_value": float(pv), "is_anomaly": bool(pv <= target_fpr), "threshold": thr if math.isfinite(thr) else None}
            for s, b, pv in zip(nll, below, p)
        ]
