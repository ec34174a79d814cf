"""Bits/dim and NLL evaluation on a dataset split, deterministic for a given seed."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..density import DensityModel


def _batch_log_prob(model: DensityModel, batch: np.ndarray, g: torch.Generator, iw_samples: int) -> float:
    """Summed log-probability (nats) of one batch, on the model's device."""
    x = torch.from_numpy(np.array(batch))  # a copy: loaders hand out read-only views (memory maps, IDX buffers)
    lp = model.log_prob_iw(x, iw_samples, generator=g) if iw_samples > 1 else model.log_prob(x, noise=model.noise(len(x), g))
    return float(lp.double().sum())


def evaluate(
    model: DensityModel,
    data: np.ndarray,
    batch_size: int = 256,
    seed: int = 0,
    iw_samples: int = 1,
) -> dict[str, float]:
    """Mean NLL (nats per example) and bits/dim over ``data``.

    ``iw_samples = 1`` gives the variational (single-sample) bound; ``S > 1`` the
    importance-weighted bound with S dequantization samples per example. The dequantization
    noise comes from a generator seeded with ``seed``, so repeated calls agree exactly.
    """
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, n = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            total += _batch_log_prob(model, data[start : start + batch_size], g, iw_samples)
            n += len(data[start : start + batch_size])
    nll = -total / n
    return {
        "nll_nats": nll,
        "bits_per_dim": nll / (model.spec.dims * math.log(2)),
        "bound": "iw" if iw_samples > 1 else "variational",
        "iw_samples": iw_samples,
        "examples": n,
    }
