"""Log-space arithmetic on numpy arrays, in float64."""

from __future__ import annotations

import numpy as np


def log_mean_exp(a: np.ndarray, axis: int = -1) -> np.ndarray:
    """``log(mean(exp(a)))`` along ``axis``, float64, without overflow: ``max + log(mean(exp(a − max)))``.

    A slice whose values are all ``-inf`` gives ``-inf``; a NaN anywhere in a slice gives NaN (callers
    that mean "no weight" map NaN to ``-inf`` first).
    """
    a = np.asarray(a, dtype=np.float64)
    top = np.max(a, axis=axis, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.squeeze(safe, axis) + np.log(np.mean(np.exp(a - safe), axis=axis))
    top = np.squeeze(top, axis)
    return np.where(np.isneginf(top), top, out)
