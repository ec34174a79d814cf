"""Invertible channel mixing: Glow's 1×1 convolution, plain and LU-parametrised.

On ``(B, C)`` vectors the same layers are learned linear maps ``z = W x``; on images
``(B, C, H, W)`` they act per position, so ``logdet = H·W·log|det W|``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bijector


SUM_MAX_CHANNELS = 8
"""Up to this many channels, :func:`_apply` mixes a CPU sequence or image by multiply-sum, not convolution."""


def _apply(x: Tensor, w: Tensor) -> Tensor:
    """``W`` applied over dim 1 of ``(B, C)``, ``(B, C, T)`` or ``(B, C, H, W)``.

    On the CPU, a sequence or image of at most :data:`SUM_MAX_CHANNELS` channels is mixed as
    ``z[:, o] = Σ_c W[o, c] · x[:, c]``, summed in channel order by elementwise multiplies and adds.
    A 1×1 convolution that small costs oneDNN's fixed cost per call (tens of µs), plus two layout
    reorders in a traced graph, many times its arithmetic: the bundled digits Glow scores 1.31× as
    many rows a second at one row this way, 1.04× at 256 (``bench/traced.py``). Each row's sums
    are its own, so results stay independent of batch-mates. Not in ONNX export (the exported
    graph keeps its Conv), not on other devices.
    """
    if x.dim() == 2:
        return x @ w.T
    if x.shape[1] <= SUM_MAX_CHANNELS and x.device.type == "cpu" and not torch.onnx.is_in_onnx_export():
        shape = (1, -1) + (1,) * (x.dim() - 2)
        z = x[:, :1] * w[:, 0].view(shape)
        for c in range(1, x.shape[1]):
            z = z + x[:, c : c + 1] * w[:, c].view(shape)
        return z
    if x.dim() == 3:
        return F.conv1d(x, w.view(*w.shape, 1))
    return F.conv2d(x, w.view(*w.shape, 1, 1))


def _random_rotation(c: int, generator: torch.Generator | None = None) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=generator, dtype=torch.float64))
    return q.float()


class _ChannelMixing(Bijector):
    """Shared forward/inverse for ``z = W x``; subclasses define ``weight_matrix()`` and ``log_abs_det()``.

    ``freeze()`` caches ``W``, ``W⁻¹`` and ``log|det W|`` (computed in float64) as constants, so
    an exported graph holds plain matrices (ONNX has no LU, inverse or slogdet operators).
    """

    _frozen: tuple[Tensor, Tensor, Tensor] | None = None

    def weight_matrix(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_abs_det(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def freeze(self) -> None:
        w = self.weight_matrix().double()
        self._frozen = (w.float(), torch.linalg.inv(w).float(), self.log_abs_det().double().float())

    def _parts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
        if self._frozen is not None:
            w, w_inv, logdet = self._frozen
            return w.to(dtype), w_inv.to(dtype), logdet.to(dtype)
        return self.weight_matrix().to(dtype), None, self.log_abs_det().to(dtype)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w, _, logdet = self._parts(x.dtype)
        positions = x[0, 0].numel()
        return _apply(x, w), (logdet * positions).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        _, w_inv, _ = self._parts(z.dtype)
        if w_inv is None:
            w_inv = torch.linalg.inv(self.weight_matrix().double()).to(z.dtype)
        return _apply(z, w_inv)


class InvConv1x1(_ChannelMixing):
    """Plain invertible 1×1 convolution; ``log|det W|`` computed in float64."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(_random_rotation(num_channels))

    def weight_matrix(self) -> Tensor:
        return self.weight

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.weight.double()).logabsdet


class InvConv1x1LU(_ChannelMixing):
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

    def weight_matrix(self) -> Tensor:
        eye = torch.eye(self.perm.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def log_abs_det(self) -> Tensor:
        return self.log_s.sum()


class Pointwise(_ChannelMixing):
    """Flow++'s Pointwise: a plain ``c×c`` matrix per group (one per coupling half), started at ``I + 0.001·N(0, 1)``.

    ``W = blockdiag(W_1, …, W_G)`` over ``C = G·c`` channels; ``log|det W| = Σ_g log|det W_g|`` in float64.
    """

    def __init__(self, num_channels: int, groups: int = 1, noise: float = 1e-3) -> None:
        super().__init__()
        if num_channels % groups:
            raise ValueError(f"{num_channels} channels do not split into {groups} groups")
        c = num_channels // groups
        self.weight = nn.Parameter(torch.eye(c).repeat(groups, 1, 1) + noise * torch.randn(groups, c, c))

    def weight_matrix(self) -> Tensor:
        return torch.block_diag(*self.weight.unbind(0))

    def log_abs_det(self) -> Tensor:
        return torch.linalg.slogdet(self.weight.double()).logabsdet.sum()
