"""Invertible butterfly layers (Meng et al. 2022), O(D) per factor.

A level-k factor cuts the flattened vector ``x ∈ ℝ^D`` into ``2^k`` contiguous blocks of length
``L = D / 2^k`` and mixes element ``j`` with element ``j + L/2`` of each block by a 2×2 matrix
(untied: one per pair; tied: one per block). A layer with ``K`` levels applies the factors at
levels ``0, 1, …, K−1`` in that order; with ``K = log2 D`` it is a full butterfly matrix, which
can express any permutation and FFT-like structure.

Parametrisation (invertible by construction). Each 2×2 block is

    M = R(θ) · [[e^{s₁}, t], [0, e^{s₂}]],   det M = e^{s₁ + s₂} > 0,

a rotation times an upper-triangular matrix with a positive diagonal. Every 2×2 matrix with a
positive determinant has this form (QR decomposition), so the layer covers the same blocks the
paper's free 2×2 matrices do, minus reflections, and can never become singular. Four parameters
per block, as in the paper. ``log|det| = Σ_blocks (s₁ + s₂)`` (times ``L/2`` for tied blocks).
Initialisation: identity (θ = s = t = 0) or random rotations (θ ~ U[0, 2π)).

Kernels: ``kernel="auto"`` runs the levels of a layer in one fused Triton launch per direction on
CUDA (up to 12 levels a launch; :mod:`models.flows.butterfly_kernel`; the backward too), and this
module's per-level PyTorch code elsewhere and for float64; ``"torch"`` and ``"triton"`` force one. The PyTorch code is the reference the
kernel is tested against.

Layouts for images ``(C, H, W)``: ``channel_major`` flattens C·H·W as stored (NCHW);
``channel_last`` flattens H·W·C (channels vary fastest). ``partitions = P`` (a power of two)
applies independent butterflies to the P contiguous chunks (the block-wise variant): for the
untied layer this is the level-``log2 P``-and-below part of a butterfly on the whole vector.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
from torch import Tensor, nn

from .base import Bijector, channels_first, channels_last

Kernel = Literal["auto", "torch", "triton"]
log = logging.getLogger(__name__)


def max_levels(d: int) -> int:
    """The largest K with ``d`` divisible by ``2^K``: the exponent of 2 in ``d``."""
    k = 0
    while d % (2 ** (k + 1)) == 0:
        k += 1
    return k


def block_matrices(theta: Tensor, s1: Tensor, s2: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entries ``(a, b, c, d)`` of ``M = R(θ) · [[e^{s₁}, t], [0, e^{s₂}]]`` per block (any common shape)."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    e1, e2 = torch.exp(s1), torch.exp(s2)
    return cos * e1, cos * t - sin * e2, sin * e1, sin * t + cos * e2


def inverse_block_matrices(theta: Tensor, s1: Tensor, s2: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entries of ``M⁻¹ = U⁻¹ Rᵀ`` per block, in closed form (:meth:`ButterflyFactor.inverse` applies it in two steps)."""
    cos, sin, i1, i2 = torch.cos(theta), torch.sin(theta), torch.exp(-s1), torch.exp(-s2)
    return cos * i1 + t * sin * i1 * i2, sin * i1 - t * cos * i1 * i2, -sin * i2, cos * i2


class ButterflyFactor(nn.Module):
    """One level-k factor on vectors ``(B, D)``; see the module docstring for the math."""

    def __init__(self, dim: int, level: int, tied: bool = False, init: Literal["identity", "rotation"] = "identity") -> None:
        super().__init__()
        if dim % (2 ** (level + 1)):
            raise ValueError(f"a level-{level} butterfly factor needs D divisible by {2 ** (level + 1)}, got D = {dim}")
        self.dim, self.level, self.tied = dim, level, tied
        self.blocks = 2**level
        self.half = dim // (2 * self.blocks)
        shape = (self.blocks, 1) if tied else (self.blocks, self.half)
        theta = torch.rand(shape) * (2 * math.pi) if init == "rotation" else torch.zeros(shape)
        self.theta = nn.Parameter(theta)
        self.s1 = nn.Parameter(torch.zeros(shape))
        self.s2 = nn.Parameter(torch.zeros(shape))
        self.t = nn.Parameter(torch.zeros(shape))

    def matrices(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Entries ``(a, b, c, d)`` of every block's matrix ``[[a, b], [c, d]]``, each ``(2^k, L/2 or 1)``."""
        return block_matrices(self.theta, self.s1, self.s2, self.t)

    def log_abs_det(self) -> Tensor:
        ld = (self.s1 + self.s2).sum()
        return ld * self.half if self.tied else ld

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        xv = x.reshape(b, self.blocks, 2, self.half)
        u, v = xv[:, :, 0], xv[:, :, 1]
        a, bb, c, d = (m.to(x.dtype) for m in self.matrices())
        return torch.stack([a * u + bb * v, c * u + d * v], 2).reshape(b, self.dim)

    def inverse(self, y: Tensor) -> Tensor:
        """``M⁻¹ = U⁻¹ Rᵀ``: rotate back, then undo the triangular part; O(D)."""
        b = y.shape[0]
        yv = y.reshape(b, self.blocks, 2, self.half)
        p, q = yv[:, :, 0], yv[:, :, 1]
        cos, sin = torch.cos(self.theta).to(y.dtype), torch.sin(self.theta).to(y.dtype)
        r1, r2 = cos * p + sin * q, -sin * p + cos * q
        v = r2 * torch.exp(-self.s2).to(y.dtype)
        u = (r1 - self.t.to(y.dtype) * v) * torch.exp(-self.s1).to(y.dtype)
        return torch.stack([u, v], 2).reshape(b, self.dim)


class Butterfly(Bijector):
    """A K-level butterfly layer on ``(B, *shape)`` inputs, flattened per ``layout``; shapes unchanged."""

    def __init__(
        self,
        shape: tuple[int, ...],
        levels: int,
        tied: bool = False,
        init: Literal["identity", "rotation"] = "identity",
        layout: Literal["channel_major", "channel_last"] = "channel_major",
        partitions: int = 1,
        kernel: Kernel = "auto",
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.layout = layout
        self.kernel: Kernel = kernel
        d = math.prod(self.shape)
        if partitions < 1 or partitions & (partitions - 1):
            raise ValueError(f"partitions must be a power of two, got {partitions}")
        offset = int(math.log2(partitions))
        allowed = max_levels(d) - offset
        if levels < 1 or levels > allowed:
            raise ValueError(f"D = {d} ({' × '.join(map(str, self.shape))}) with {partitions} partition(s) allows 1..{allowed} butterfly levels, got {levels}")
        self.factors = nn.ModuleList(ButterflyFactor(d, offset + k, tied, init) for k in range(levels))
        self.dim, self.levels, self.offset = d, levels, offset

    def _fused(self, x: Tensor) -> bool:
        """Whether this call runs the fused kernel (see the module docstring). Triton is imported only here,
        and only for CUDA tensors or a forced ``"triton"``."""
        if self.kernel == "torch" or (self.kernel == "auto" and (not x.is_cuda or x.dtype == torch.float64)):
            return False
        if self.kernel == "triton":
            return True
        return self._kernel_module().triton_available()

    @staticmethod
    def _kernel_module():  # noqa: ANN205 - imported on first use: Triton is optional
        from . import butterfly_kernel

        return butterfly_kernel

    def _kernel_levels(self, h: Tensor, inverse: bool) -> Tensor:
        """Every level through the kernel, in launches of at most ``MAX_LEVELS`` levels (the inverse
        matrices only where needed: for the inverse, and for the backward of a forward under autograd)."""
        kernel = self._kernel_module()
        groups = kernel.level_groups(self.levels)
        icoef = self.coefficients(inverse=True) if inverse or torch.is_grad_enabled() else None
        if inverse:
            for first, n in reversed(groups):
                h = kernel.butterfly_inverse(h, icoef[first : first + n], n, self.offset + first)
            return h
        coef = self.coefficients()
        for first, n in groups:
            part = slice(first, first + n)
            h = kernel.butterfly_forward(h, coef[part], None if icoef is None else icoef[part], n, self.offset + first)
        return h

    def _fused_or_none(self, h: Tensor, inverse: bool) -> Tensor | None:
        """``h`` through the fused kernel when this call should use it; ``None`` when it should not, or when
        the kernel cannot be built here (then this layer keeps the PyTorch levels, with a warning)."""
        if not self._fused(h):
            return None
        try:
            return self._kernel_levels(h, inverse)
        except self._kernel_module().kernel_errors() as e:
            if self.kernel == "triton":
                raise
            log.warning("the fused butterfly kernel cannot run here (%s); using the PyTorch levels", e)
            self.kernel = "torch"
            return None

    def coefficients(self, inverse: bool = False) -> Tensor:
        """Every level's pair matrices ``M`` (differentiable), or their inverses (float64 arithmetic, not
        differentiable), as ``(levels, 4, D/2)`` float32 ``[a, b, c, d]`` (tied blocks repeated per pair):
        the kernel's input, computed for all levels at once."""
        def stacked(name: str) -> Tensor:
            return torch.stack([getattr(f, name).expand(f.blocks, f.half).reshape(-1) for f in self.factors])

        if not inverse:
            return torch.stack(block_matrices(*(stacked(n) for n in ("theta", "s1", "s2", "t"))), 1).float()
        with torch.no_grad():
            return torch.stack(inverse_block_matrices(*(stacked(n).double() for n in ("theta", "s1", "s2", "t"))), 1).float()

    def _flat(self, x: Tensor) -> Tensor:
        if self.layout == "channel_last" and x.dim() > 2:
            x = channels_last(x)
        return x.reshape(x.shape[0], -1)

    def _unflat(self, x: Tensor) -> Tensor:
        if self.layout == "channel_last" and len(self.shape) > 1:
            return channels_first(x.reshape(x.shape[0], *self.shape[1:], self.shape[0]))
        return x.reshape(x.shape[0], *self.shape)

    def log_abs_det(self) -> Tensor:
        return sum(f.log_abs_det() for f in self.factors)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self._flat(x)
        fused = self._fused_or_none(h, inverse=False)
        if fused is not None:
            h = fused
        else:
            for f in self.factors:
                h = f(h)
        return self._unflat(h), self.log_abs_det().to(x.dtype).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        h = self._flat(z)
        if not (torch.is_grad_enabled() and (h.requires_grad or self.factors[0].theta.requires_grad)):  # no kernel backward
            fused = self._fused_or_none(h, inverse=True)
            if fused is not None:
                return self._unflat(fused)
        for f in reversed(self.factors):
            h = f.inverse(h)
        return self._unflat(h)
