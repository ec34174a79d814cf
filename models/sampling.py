"""Samples of records that are valid records: inside the schema's ranges, on integer levels, derived features consistent.

A flow's support is all of ``R^D``, so a sample can leave a feature's range (FiO2 0.2093 below
0.21) and a feature that the schema defines as the sum of others (the Glasgow total) can
disagree with them. Two rules, in this order:

* **Derived features by construction.** A feature declared in ``DataSpec.derived`` is replaced by
  the sum of its components in every sample (the model's own value of it is discarded); discrete
  features are floored to their integer level first, as :meth:`DensityModel.sample` does.
* **Ranges by rejection.** A sample with any feature outside ``DataSpec.ranges`` is rejected and
  redrawn from fresh latents, for up to :data:`MAX_ROUNDS` rounds; samples are then draws from
  the model's distribution restricted to the box of valid records. Round ``r`` draws its latents
  from the seed ``(seed, r)`` (round 0: the request's seed alone), so a seeded request is
  reproducible and row ``i`` is the first valid draw of its own sequence.

:func:`rejection` is a generator shared by :meth:`models.density.DensityModel.sample` and the
service (whose draws go through its batcher): it yields latents ``z (k, D)`` and receives their
samples ``(k, *shape)``.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

import numpy as np

from .errors import FlowserveError
from .spec import DataSpec

MAX_ROUNDS = 32


class SamplingError(FlowserveError, ValueError):
    """Too few samples fell inside the schema's ranges (the temperature is too high for them)."""


def needs_rejection(spec: DataSpec) -> bool:
    """Records with ranges or derived features."""
    return spec.kind == "record" and bool(spec.ranges or spec.derived)


def derive(spec: DataSpec, x: np.ndarray) -> np.ndarray:
    """``(N, D)`` samples with discrete features floored and derived features set to the sum of their components."""
    x = np.array(x, dtype=np.float32, copy=True)
    if spec.discrete_features:
        x[:, spec.discrete_features] = np.floor(x[:, spec.discrete_features])
    names = spec.feature_names or []
    for feature, parts in (spec.derived or {}).items():
        x[:, names.index(feature)] = x[:, [names.index(p) for p in parts]].sum(1)
    return x


def valid(spec: DataSpec, x: np.ndarray) -> np.ndarray:
    """``(N,)`` whether each record is finite and inside every feature's range."""
    ok = np.isfinite(x).all(1)
    if spec.ranges:
        lo, hi = np.asarray(spec.ranges, dtype=np.float32).T
        ok &= ((x >= lo) & (x <= hi)).all(1)
    return ok


def round_seed(seed: int, r: int) -> int | list[int]:
    """The seed of rejection round ``r`` (round 0: ``seed`` itself)."""
    return seed if r == 0 else [seed, r]


def rejection(spec: DataSpec, n: int, latent: Callable[[int, int], np.ndarray],
              max_rounds: int = MAX_ROUNDS) -> Generator[np.ndarray, np.ndarray, np.ndarray]:
    """Yield latents, receive their samples; return ``n`` valid records ``(n, D)``.

    ``latent(k, r)`` draws ``k`` latents for round ``r``. Raises :class:`SamplingError` when some
    rows are still invalid after ``max_rounds`` rounds.
    """
    out = np.empty((n, spec.dims), dtype=np.float32)
    todo = np.arange(n)
    for r in range(max_rounds):
        z = latent(n, r)  # every row draws its round-r latent, so row i's sequence does not depend on the others
        x = derive(spec, (yield z[todo]))
        ok = valid(spec, x)
        out[todo[ok]] = x[ok]
        todo = todo[~ok]
        if not len(todo):
            return out
    raise SamplingError(f"{len(todo)} of {n} samples were still outside the schema's ranges after {max_rounds} rounds of "
                        "rejection; lower the temperature")


def run(gen: Generator[np.ndarray, np.ndarray, np.ndarray], draw: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Drive :func:`rejection` with a synchronous ``draw(z) -> samples``."""
    z = next(gen)
    while True:
        try:
            z = gen.send(draw(z))
        except StopIteration as done:
            return done.value
