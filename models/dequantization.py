"""Dequantization: from discrete levels ``x ∈ {0..L−1}^D`` to continuous ``v = x + u``, ``u ∈ [0, 1)^D``.

``log P(x) ≥ E_{u~q(u|x)}[log p(x + u) − log q(u|x)]`` (nats). Uniform dequantization is the
special case ``q = U(0, 1)^D``, ``log q = 0``; Flow++'s variational dequantization learns ``q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .flows import Bijector, ColumnMerge, ColumnSplit, MixtureCDFCoupling, Sigmoid, standard_normal_log_prob
from .precision import conditioned


class UniformDequantizer(nn.Module):
    """``u = ε``, ``ε ~ U(0, 1)^D``; ``log q(u|x) = 0``.

    With ``features`` (indices into the last axis of a record), only those are dequantized: ``u = ε ⊙ m``.
    """

    def __init__(self, features: list[int] | None = None, dims: int | None = None) -> None:
        super().__init__()
        self.register_buffer("mask", None if features is None else torch.zeros(dims).index_fill_(0, torch.tensor(features), 1.0))

    distribution = "uniform[0,1)"

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
        """Draw the noise ``ε`` this dequantizer consumes, shape ``(B, *data_shape)``, on ``generator``'s device or ``device``."""
        return torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, ε) -> (u, log q(u|x))`` with ``log q`` per sample ``(B,)`` in nats."""
        u = noise.to(x.dtype)
        return (u if self.mask is None else u * self.mask.to(x.dtype)), x.new_zeros(x.shape[0])


class VariationalDequantizer(nn.Module):
    """Flow++'s ``q(u|x)`` for images ``(B, C, H, W)``: ``ε ~ N(0, I)`` through a conditional flow, then a sigmoid.

    ``u = σ(g(ε; x))`` with ``g`` = column split → ``steps`` (couplings read a context computed
    from ``x/L − 0.5`` by ``context``) → merge. ``log q(u|x) = log N(ε) − log|det ∂u/∂ε|`` (nats,
    per sample). The noise ``ε`` is an explicit input, so scoring with given noise is deterministic.
    """

    def __init__(self, steps: Sequence[Bijector], context: nn.Module, levels: int) -> None:
        super().__init__()
        self.steps = nn.ModuleList(steps)
        self.context = context
        self.levels = int(levels)
        self.split, self.merge, self.sigmoid = ColumnSplit(), ColumnMerge(), Sigmoid()

    distribution = "normal(0,1)"

    def noise(self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | None = None) -> Tensor:
        """Standard normal ``ε``, shape ``(B, *data_shape)``, on ``generator``'s device or ``device``."""
        return torch.randn(shape, generator=generator, device=generator.device if generator is not None else device)

    def forward(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, ε) -> (u, log q(u|x))``; ``u ∈ (0, 1)`` with the shape of ``x``, ``log q`` ``(B,)`` nats."""
        eps = noise.to(x.dtype) if x.is_floating_point() else noise.float()
        x = x.to(eps.dtype)
        context = conditioned(self.context, self.split(x / self.levels - 0.5)[0])
        h, logdet = self.split(eps)
        for step in self.steps:
            h, ld = step(h, context) if isinstance(step, MixtureCDFCoupling) else step(h)
            logdet = logdet + ld
        h, _ = self.merge(h)
        u, ld = self.sigmoid(h)
        return u, standard_normal_log_prob(eps) - (logdet + ld)
