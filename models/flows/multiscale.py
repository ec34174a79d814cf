"""Multi-scale architecture: factor out half the channels at each level (RealNVP, Glow).

:class:`GaussianSplit` makes the factored-out half ``x_2`` standard normal given the kept half
``x_1`` with a learned conditional Gaussian (Glow's learned prior):
``z_2 = (x_2 − μ(x_1)) · exp(−log σ(x_1))``, ``logdet = −Σ log σ``. :class:`MultiScale` then
sends ``x_1`` through the inner flow and returns one flat latent ``(B, D)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..nets import ZeroConv2d
from .base import Bijector, sum_except_batch


class GaussianSplit(Bijector):
    """Conditional standardisation of the second channel half given the first; shapes unchanged."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.c1 = channels // 2
        self.prior = ZeroConv2d(self.c1, 2 * (channels - self.c1))

    def _params(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        h = self.prior(x1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.c1], x[:, self.c1 :]
        mean, log_std = self._params(x1)
        z2 = (x2 - mean) * torch.exp(-log_std)
        return torch.cat([x1, z2], 1), -sum_except_batch(log_std)

    def inverse(self, z: Tensor) -> Tensor:
        x1, z2 = z[:, : self.c1], z[:, self.c1 :]
        mean, log_std = self._params(x1)
        return torch.cat([x1, z2 * torch.exp(log_std) + mean], 1)


class MultiScale(Bijector):
    """``head`` then factor-out, then ``inner`` on the kept half; latent is flat ``(B, D)``.

    ``shape`` is the ``(C, ...)`` that ``head`` outputs; ``inner`` must take the kept half
    ``(C//2, ...)`` and return a flat latent. ``learned_prior=False`` factors out against a
    plain standard normal (no parameters).
    """

    def __init__(self, head: Bijector, shape: tuple[int, ...], inner: Bijector, learned_prior: bool = True) -> None:
        super().__init__()
        self.head = head
        self.split = GaussianSplit(shape[0]) if learned_prior else None
        self.inner = inner
        c, rest = shape[0], tuple(shape[1:])
        self.kept_shape = (c // 2, *rest)
        self.out_shape = (c - c // 2, *rest)
        self.n_kept = math.prod(self.kept_shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, logdet = self.head(x)
        if self.split is not None:
            y, ld = self.split(y)
            logdet = logdet + ld
        z1, ld_inner = self.inner(y[:, : self.kept_shape[0]])
        z2 = y[:, self.kept_shape[0] :]
        return torch.cat([z1, z2.reshape(z2.shape[0], -1)], 1), logdet + ld_inner

    def inverse(self, z: Tensor) -> Tensor:
        y1 = self.inner.inverse(z[:, : self.n_kept])
        y2 = z[:, self.n_kept :].reshape(z.shape[0], *self.out_shape)
        y = torch.cat([y1, y2], 1)
        if self.split is not None:
            y = self.split.inverse(y)
        return self.head.inverse(y)
