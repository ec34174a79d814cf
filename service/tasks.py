"""What a batch computes, per task, and the per-request inputs those computations need.

Tasks run on a device worker with a :class:`~service.runners.Runner`; their inputs are numpy
arrays whose first dimension is rows. Randomness (dequantization noise, latent draws) is made
per request from the request's seed by :mod:`models.seeding`, so results never depend on
batch-mates and equal ``models.load(...).log_prob(x, seed=seed)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from models import seeding
from models.artifacts.manifest import Manifest

from .entry import Payload

if TYPE_CHECKING:
    from .runners import Runner
    from .settings import Settings

log = logging.getLogger(__name__)



def score(runner: Runner, payload: Payload) -> np.ndarray:
    """``x (B, *shape)``, optional ``noise`` → ``log_prob (B,)`` nats."""
    return runner.log_prob(payload["x"], payload.get("noise"))


def sample(runner: Runner, payload: Payload) -> np.ndarray:
    """``z (B, D)`` (temperature already applied) → samples ``(B, *shape)`` in data space."""
    return runner.sample(payload["z"])


# The tasks every model serves (anomaly scoring and attribution reuse ``score``).
TASKS: dict[str, Callable[[Runner, Payload], np.ndarray]] = {"score": score, "sample": sample}


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
        from collections import OrderedDict

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


def call_seconds(runner: Runner, task: str, rows: int = 1, repeats: int = 3) -> float:
    """Seconds one call of ``task`` on ``rows`` rows takes, best of ``repeats`` (after :func:`warm`)."""
    payload = example_payload(runner.manifest, task, rows)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        TASKS[task](runner, payload)
        best = min(best, time.perf_counter() - t0)
    return best


def warm(runner: Runner) -> None:
    """Run each task once so the first real request does not pay for lazy initialisation."""
    out = score(runner, example_payload(runner.manifest, "score", 2))
    if not np.isfinite(out).all():
        raise RuntimeError("warm-up scoring produced non-finite log-probabilities")
    sample(runner, example_payload(runner.manifest, "sample", 2))


def check_batch_invariance(runner: Runner, settings: Settings) -> None:
    """Probe rows scored one by one and inside larger batches must agree bit for bit (``batch_invariant``).

    Scoring without tiles that fails switches to tiles of ``tile_rows`` (expected for traced
    models with fully connected layers, :mod:`service.traced`); scoring that fails with tiles
    (kernels that depend on a row's position) is reported in the runner's ``execution``.
    """
    if not settings.batch_invariant:
        return
    m = runner.manifest
    k, n = 8, 2 * max(settings.tile_rows, 64) + 5  # k probe rows, each also scored alone
    x = m.data_spec.random_examples(n, seed=11).astype(np.float32)
    noise = dequantization_noise(m, n, 11)

    def agrees() -> bool:
        alone = np.concatenate([runner.log_prob(x[i : i + 1], None if noise is None else noise[i : i + 1]) for i in range(k)])
        for size, at in ((k, 0), (19, 7), (n, n - k), (n, settings.tile_rows - 1)):
            idx = np.r_[np.arange(k, k + at), np.arange(k), np.arange(k + at, size)]
            got = runner.log_prob(x[idx], None if noise is None else noise[idx])[at : at + k]
            if not np.array_equal(got, alone, equal_nan=True):
                return False
        return True

    if agrees():
        return
    if runner.tiles["score"] is None:
        log.info("%s on %s: scored rows differ with their batch-mates; scoring in tiles of %d rows", runner.backend,
                 runner.device, settings.tile_rows)
        runner.tiles["score"] = settings.tile_rows
        runner.execution["score"] += f", tiles of {settings.tile_rows} rows"
        if agrees():
            return
    log.warning("%s on %s: rows differ with their position in a tile; results may change in the last bits with batch-mates",
                runner.backend, runner.device)
    runner.execution = {t: f"{mode}, not batch-invariant" for t, mode in runner.execution.items()}
