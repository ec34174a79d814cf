"""What a batch computes, per task, and the per-request inputs those computations need.

Tasks run on a device worker with a :class:`~service.runners.Runner`; their inputs are numpy
arrays whose first dimension is rows. Randomness (dequantization noise, latent draws) is made
per request from the request's seed by :mod:`models.seeding`, so results never depend on
batch-mates and equal ``models.load(...).log_prob(x, seed=seed)``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models import seeding
from models.artifact import Manifest
from models.dequantization import noise_distribution

from .runners import Runner

Payload = dict[str, np.ndarray]


def score(runner: Runner, payload: Payload) -> np.ndarray:
    """``x (B, *shape)``, optional ``noise`` → ``log_prob (B,)`` nats."""
    return runner.log_prob(payload["x"], payload.get("noise"))


def sample(runner: Runner, payload: Payload) -> np.ndarray:
    """``z (B, D)`` (temperature already applied) → samples ``(B, *shape)`` in data space."""
    return runner.sample(payload["z"])


# The tasks every model serves (anomaly scoring and attribution reuse ``score``).
TASKS: dict[str, Callable[[Runner, Payload], np.ndarray]] = {"score": score, "sample": sample}


def dequantization_noise(manifest: Manifest, n: int, seed: int) -> np.ndarray | None:
    """Noise the model's dequantizer consumes for ``n`` rows (``None`` for continuous data)."""
    spec = manifest.data_spec
    if not spec.dequantized:
        return None
    return seeding.dequantization_noise(noise_distribution(manifest.architecture), (n, *spec.shape), seed)


def latent(manifest: Manifest, n: int, temperature: float, seed: int | list[int]) -> np.ndarray:
    """``z ~ N(0, T² I)`` for ``n`` samples, float32 ``(n, D)``."""
    return seeding.latent(n, manifest.data_spec.dims, temperature, seed)


def warm(runner: Runner) -> None:
    """Run each task once so the first real request does not pay for lazy initialisation."""
    m = runner.manifest
    x = m.data_spec.random_examples(2)
    out = runner.log_prob(x, dequantization_noise(m, len(x), 0))
    if not np.isfinite(out).all():
        raise RuntimeError("warm-up scoring produced non-finite log-probabilities")
    runner.sample(latent(m, 2, 1.0, 0))
