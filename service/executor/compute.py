"""What a batch computes, per task, on a :class:`~service.executor.runners.Runner`; warm-up, timing and the
batch-invariance probe of a freshly opened runner.

Randomness (dequantization noise, latent draws) comes with the request's inputs
(:mod:`service.core.tasks`), so results never depend on batch-mates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from service.core.entry import Payload
from service.core.tasks import dequantization_noise, example_payload
from service.executor.runners import Runner
from service.settings import Settings

log = logging.getLogger(__name__)


def score(runner: Runner, payload: Payload) -> np.ndarray:
    """``x (B, *shape)``, optional ``noise`` → ``log_prob (B,)`` nats."""
    return runner.log_prob(payload["x"], payload.get("noise"))


def sample(runner: Runner, payload: Payload) -> np.ndarray:
    """``z (B, D)`` (temperature already applied) → samples ``(B, *shape)`` in data space."""
    return runner.sample(payload["z"])


COMPUTE: dict[str, Callable[[Runner, Payload], np.ndarray]] = {"score": score, "sample": sample}


def call_seconds(runner: Runner, task: str, rows: int = 1, repeats: int = 3) -> float:
    """Seconds one call of ``task`` on ``rows`` rows takes, best of ``repeats`` (after :func:`warm`)."""
    payload = example_payload(runner.manifest, task, rows)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        COMPUTE[task](runner, payload)
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
    models with fully connected layers, :mod:`service.executor.traced`); scoring that fails with tiles
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
