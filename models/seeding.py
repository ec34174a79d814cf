"""Per-request randomness from a seed: the one definition shared by ``models/`` and ``service/``.

A request's dequantization noise and latent draws come from numpy's PCG64 seeded with the
request's ``seed`` alone, so a row's result never depends on its batch-mates, and
``models.load(path).log_prob(x, seed=s)`` equals what the HTTP service returns for ``seed=s``.
"""

from __future__ import annotations

import numpy as np

NOISE_DISTRIBUTIONS = ("uniform[0,1)", "normal(0,1)")


def noise_distribution(architecture: dict) -> str:
    """The distribution of the dequantization noise a model with this architecture config consumes.

    ``"normal(0,1)"`` for variational dequantization (``ε`` before the learned flow), else ``"uniform[0,1)"``.
    """
    return "normal(0,1)" if architecture.get("dequantization") == "variational" else "uniform[0,1)"


def dequantization_noise(distribution: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Noise a dequantizer consumes, float32 ``shape`` = ``(B, *data_shape)``.

    ``"uniform[0,1)"`` for uniform dequantization; ``"normal(0,1)"`` for Flow++'s variational one.
    """
    rng = np.random.default_rng(seed)
    if distribution == "normal(0,1)":
        return rng.standard_normal(shape, dtype=np.float32)
    if distribution == "uniform[0,1)":
        return rng.random(shape, dtype=np.float32)
    raise ValueError(f"unknown noise distribution {distribution!r}; expected one of {NOISE_DISTRIBUTIONS}")


def latent(n: int, dims: int, temperature: float, seed: int | list[int]) -> np.ndarray:
    """``z ~ N(0, T² I)``, float32 ``(n, dims)``, for ``n`` samples at temperature ``T``."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dims), dtype=np.float32) * np.float32(temperature)
