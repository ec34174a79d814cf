"""Dequantization: from discrete levels ``x ∈ {0..L−1}^D`` to continuous ``v = x + u``, ``u ∈ [0, 1)^D``.

``log P(x) ≥ E_{u~q(u|x)}[log p(x + u) − log q(u|x)]`` (nats). Uniform dequantization is the
special case ``q = U(0, 1)^D``, ``log q = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class UniformDequantizer(nn.Module):
    """``u = ε``, ``ε ~ U(0, 1)^D``; ``log q(u|x) = 0``."""

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
        """Draw the noise ``ε`` this dequantizer consumes, shape ``(B, *data_shape)``."""
        return torch.rand(shape, generator=generator, device=device)

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, ε) -> (u, log q(u|x))`` with ``log q`` per sample ``(B,)`` in nats."""
        return noise.to(x.dtype), x.new_zeros(x.shape[0])
