"""Fixed maps between data space and the flow's unbounded space.

* :class:`Logit` for dequantized pixels ``v ∈ [0, L)``: ``p = α + (1 − 2α)·v/L``, ``y = log p − log(1 − p)``.
* :class:`Sigmoid`, the last layer of Flow++'s dequantization flow (``ℝ → (0, 1)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Bijector, sum_except_batch


class Logit(Bijector):
    """``v ∈ [0, L)`` (dequantized levels) to ``ℝ``.

    ``logdet = D·log((1 − 2α)/L) − Σ [log p + log(1 − p)]`` per sample, in nats.
    """

    def __init__(self, levels: int, alpha: float = 0.05) -> None:
        super().__init__()
        self.levels = int(levels)
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        scale = (1 - 2 * self.alpha) / self.levels
        p = self.alpha + scale * x
        y = torch.log(p) - torch.log1p(-p)
        d = x[0].numel()
        logdet = d * math.log(scale) - sum_except_batch(torch.log(p) + torch.log1p(-p))
        return y, logdet

    def inverse(self, z: Tensor) -> Tensor:
        p = torch.sigmoid(z)
        return (p - self.alpha) * self.levels / (1 - 2 * self.alpha)




class Sigmoid(Bijector):
    """``y = σ(x)`` elementwise, ``ℝ → (0, 1)``; ``logdet = −Σ [softplus(x) + softplus(−x)]``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.sigmoid(x), -sum_except_batch(F.softplus(x) + F.softplus(-x))

    def inverse(self, z: Tensor) -> Tensor:
        return torch.log(z) - torch.log1p(-z)


__all__ = ["Logit", "Sigmoid"]
