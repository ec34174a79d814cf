"""Bits/dim and NLL evaluation on a dataset split, deterministic for a given seed."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..density import DensityModel
from .distributed import World


def _device_of(model: DensityModel) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _batch_log_prob(model: DensityModel, batch: np.ndarray, g: torch.Generator, iw_samples: int, part: slice | None = None) -> float:
    """Summed log-probability (nats) of one batch, on the model's device; of the rows ``part`` of it only when given
    (the noise is drawn for the whole batch either way, so the parts of all ranks add up to the whole)."""
    x = torch.from_numpy(np.array(batch))  # a copy: loaders hand out read-only views (memory maps, IDX buffers)
    if iw_samples > 1:
        if part is not None:
            raise ValueError("the importance-weighted bound is evaluated in one process")
        return float(model.log_prob_iw(x, iw_samples, generator=g).double().sum())
    noise = model.noise(len(x), g)
    if part is not None:
        x, noise = x[part], None if noise is None else noise[part]
    return float(model.log_prob(x, noise=noise).double().sum()) if len(x) else 0.0


def evaluate(
    model: DensityModel,
    data: np.ndarray,
    batch_size: int = 256,
    seed: int = 0,
    iw_samples: int = 1,
    world: World | None = None,
) -> dict[str, float]:
    """Mean NLL (nats per example) and bits/dim over ``data``.

    ``iw_samples = 1`` gives the variational (single-sample) bound; ``S > 1`` the
    importance-weighted bound with S dequantization samples per example. The dequantization
    noise comes from a generator seeded with ``seed``, so repeated calls agree exactly.

    ``world`` (data-parallel training, :mod:`models.training.distributed`): each rank scores its share
    of every batch and the sums are added across ranks; every rank gets the whole result, the same
    (up to the order of the sum) as one process's.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            rows = data[start : start + batch_size]
            part = world.share(len(rows)) if world is not None and world.distributed else None
            total += _batch_log_prob(model, rows, g, iw_samples, part)
            n += len(data[start : start + batch_size])
    if world is not None and world.distributed:
        total = float(world.all_sum(torch.tensor([total], dtype=torch.float64, device=_device_of(model)))[0])
    nll = -total / n
    return {
        "nll_nats": nll,
        "bits_per_dim": nll / (model.spec.dims * math.log(2)),
        "bound": "iw" if iw_samples > 1 else "variational",
        "iw_samples": iw_samples,
        "examples": n,
    }
