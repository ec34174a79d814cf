"""The tasks a served model computes, what they return, and the per-request inputs they need.

The tasks run in an executor (:mod:`service.executor.compute`); their inputs are numpy arrays
whose first dimension is rows. Randomness (dequantization noise, latent draws) is made
per request from the request's seed by :mod:`models.seeding`, so results never depend on
batch-mates and equal ``models.load(...).log_prob(x, seed=seed)``.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from models import seeding
from models.artifacts.manifest import Manifest
from service.core.entry import Payload

TASKS = ("score", "sample")  # every model serves both (anomaly scoring and attribution reuse ``score``)


def output_of(task: str, manifest: Manifest, rows: int) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of what ``task`` returns for ``rows`` rows (where a front-end makes room for it)."""
    if task == "score":
        return (rows,), np.dtype(np.float64)
    if task == "sample":
        return (rows, *manifest.data_spec.shape), np.dtype(np.float32)
    raise KeyError(task)


def dequantization_noise(manifest: Manifest, n: int, seed: int) -> np.ndarray | None:
    """Noise the model's dequantizer consumes for ``n`` rows (``None`` for continuous data)."""
    spec = manifest.data_spec
    if not spec.dequantized:
        return None
    return seeding.dequantization_noise(seeding.noise_distribution(manifest.architecture), (n, *spec.shape), seed)


class NoiseCache:
    """Dequantization noise by ``(distribution, shape, seed)``, least recently used first out.

    Drawing it (a PCG64 seeded per request) is a sixth of a small request's time in a front-end;
    clients mostly send the default seed. Only small arrays are kept (``max_elements`` each), and
    they are read-only, so a cached array cannot be changed by whoever receives it.
    """

    def __init__(self, entries: int = 256, max_elements: int = 1 << 14) -> None:
        self.entries, self.max_elements = entries, max_elements
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def noise(self, manifest: Manifest, n: int, seed: int) -> np.ndarray | None:
        spec = manifest.data_spec
        if not spec.dequantized:
            return None
        key = (seeding.noise_distribution(manifest.architecture), n, *spec.shape, seed)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        out = dequantization_noise(manifest, n, seed)
        if out.size <= self.max_elements:
            out.flags.writeable = False
            self._cache[key] = out
            if len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return out


def latent(manifest: Manifest, n: int, temperature: float, seed: int | list[int]) -> np.ndarray:
    """``z ~ N(0, T² I)`` for ``n`` samples, float32 ``(n, D)``."""
    return seeding.latent(n, manifest.data_spec.dims, temperature, seed)


def example_payload(manifest: Manifest, task: str, rows: int, seed: int = 0) -> Payload:
    """A valid ``task`` payload of ``rows`` random rows (warm-up and timing)."""
    if task == "score":
        x = manifest.data_spec.random_examples(rows, seed)
        noise = dequantization_noise(manifest, rows, seed)
        return {"x": x} if noise is None else {"x": x, "noise": noise}
    if task == "sample":
        return {"z": latent(manifest, rows, 1.0, seed)}
    raise KeyError(task)
