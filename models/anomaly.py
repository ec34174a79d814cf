"""Calibrated anomaly scores from a flow's negative log-likelihood.

Score ``s(x) = −log p(x)`` in nats per record (higher = more anomalous). At training end a
held-out set of normal records (the validation split) is scored and its scores stored in the
artifact. For a new record with score ``s`` and calibration scores ``c_1..c_n``:

* ``percentile = 100 · #{c_i ≤ s} / n``;
* conformal p-value ``p = (1 + #{c_i ≥ s}) / (n + 1)`` (valid when the new record is exchangeable
  with the calibration records, i.e. normal);
* ``is_anomaly = p ≤ α`` for a target false-positive rate ``α``; equivalently ``s`` is above the
  threshold ``c_(k)``, ``k = ⌈(n + 1)(1 − α)⌉`` (no threshold, never anomalous, when ``k > n``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .density import DensityModel

MAX_CALIBRATION = 5000


def calibrate(model: DensityModel, normal: np.ndarray, batch_size: int = 1024, seed: int = 0) -> dict:
    """Score held-out normal records; returns the calibration stored in the manifest."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    scores = []
    with torch.no_grad():
        for i in range(0, len(normal), batch_size):
            x = torch.from_numpy(np.asarray(normal[i : i + batch_size], dtype=np.float32))
            scores.append(-model.log_prob(x, generator=g).double().numpy())
    s = np.sort(np.concatenate(scores))
    if not np.isfinite(s).all():
        raise ValueError("calibration scores contain non-finite values")
    if len(s) > MAX_CALIBRATION:  # keep evenly spaced order statistics
        s = s[np.linspace(0, len(s) - 1, MAX_CALIBRATION).round().astype(int)]
    return {"method": "conformal", "score": "nll_nats", "split": "val", "n": int(len(s)), "scores": s.tolist()}


class AnomalyScorer:
    """Turns NLL scores into percentiles, conformal p-values and decisions."""

    def __init__(self, calibration: dict) -> None:
        self.scores = np.asarray(calibration["scores"], dtype=np.float64)
        self.n = len(self.scores)

    def threshold(self, target_fpr: float) -> float:
        """Score above which a record is flagged at false-positive rate ``target_fpr`` (``inf`` if none)."""
        k = math.ceil((self.n + 1) * (1 - target_fpr))
        return float(self.scores[k - 1]) if 1 <= k <= self.n else math.inf

    def assess(self, nll: np.ndarray, dims: int, target_fpr: float = 0.01) -> list[dict]:
        """Per record: ``nll`` (nats), ``nll_per_dim``, ``percentile``, ``p_value``, ``is_anomaly``."""
        nll = np.asarray(nll, dtype=np.float64)
        below = np.searchsorted(self.scores, nll, side="right")  # #{c ≤ s}
        at_or_above = self.n - np.searchsorted(self.scores, nll, side="left")  # #{c ≥ s}
        p = (1 + at_or_above) / (self.n + 1)
        thr = self.threshold(target_fpr)
        return [
            {"nll": float(s), "nll_per_dim": float(s / dims), "percentile": float(100 * b / self.n),
             "p_value": float(pv), "is_anomaly": bool(pv <= target_fpr), "threshold": thr if math.isfinite(thr) else None}
            for s, b, pv in zip(nll, below, p)
        ]
