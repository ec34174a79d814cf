"""Invertible channel mixing: Glow's 1×1 convolution, plain and LU-parametrised.

On ``(B, C)`` vectors the same layers are learned linear maps ``z = W x``; on images
``(B, C, H, W)`` they act per position, so ``logdet = H·W·log|det W|``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bijector


def _apply(x: Tensor, w: Tensor) -> Tensor:
    if x.dim() == 2:
        return x @ w.T
    return F.conv2d(x, w.view(*w.shape, 1, 1))


def _random_rotation(c: int, generator: torch.Generator | None = None) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))
    return q.float()


class InvConv1x1(Bijector):
    """Plain invertible 1×1 convolution; ``log|det W|`` computed in float64."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(num_channels))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logabsdet = torch.linalg.slogdet(self.weight.double()).logabsdet.to(x.dtype)
        positions = x[0, 0].numel()
        return _apply(x, self.weight.to(x.dtype)), (logabsdet * positions).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight.double()).to(z.dtype)
        return _apply(z, w_inv)


class InvConv1x1LU(Bijector):
    """LU-parametrised 1×1 convolution: ``W = P L (U + diag(sign · exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower-triangular, ``U`` strictly upper.
    ``log|det W| = Σ log_s``, O(C); invertible for every parameter value.
    """

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        p, lower, upper = torch.linalg.lu(_random_rotation(num_channels))
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(num_channels, num_channels), -1))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> Tensor:
        eye = torch.eye(self.perm.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        positions = x[0, 0].numel()
        logdet = self.log_s.sum() * positions
        return _apply(x, self.weight().to(x.dtype)), logdet.to(x.dtype).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight().double()).to(z.dtype)
        return _apply(z, w_inv)
