"""Batch moments for the data-dependent initialisation of layers (:func:`models.flows.base.data_init`), summed over
the ranks of a data-parallel job when asked, so that every rank sets what one process would set from the whole batch."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]  # sums a tensor over the ranks of a data-parallel job (in place) and returns it


def moments(x: Tensor, dims: tuple[int, ...], reduce: Reduce | None = None) -> tuple[Tensor, Tensor]:
    """Mean and (biased) variance of ``x`` over ``dims``. With ``reduce``, over the ``x`` of every rank: the sums
    and counts are all-reduced in float64, the mean first and then the squared deviations from it."""
    if reduce is None:
        return x.mean(dim=dims), x.var(dim=dims, unbiased=False)
    x64 = x.double()
    kept = [s for d, s in enumerate(x.shape) if d not in dims]
    n = reduce(torch.tensor([x64.numel() / max(1, math.prod(kept))], dtype=torch.float64, device=x.device))
    mean = reduce(x64.sum(dim=dims, keepdim=True)) / n
    var = reduce(((x64 - mean) ** 2).sum(dim=dims, keepdim=True)) / n
    return mean.reshape(kept).to(x.dtype), var.reshape(kept).to(x.dtype)
