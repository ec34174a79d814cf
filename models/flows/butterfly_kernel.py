"""A fused butterfly kernel (Triton): up to 12 levels of a :class:`~models.flows.butterfly.Butterfly` layer in one launch.

The eager path runs ~10 small tensor ops per level (a 12-level layer is >100 kernel launches per
direction); here one program holds a vector of ``N = 2^levels`` elements in registers and applies
all levels to it, reading and writing the layer's input and output once.

Indexing. A layer over levels ``g = o … o+n−1`` of a vector ``x ∈ ℝ^D`` (``o = log2 partitions``)
mixes elements whose flat index ``i = hi·(N·R) + t·R + lo`` differ only in ``t ∈ [0, N)``, with
``R = D / (2^o · N)``. Level ``o+k`` pairs ``t`` with ``t XOR N/2^(k+1)``. A program owns one row, one
``hi`` and a tile of ``lo`` (a ``(N, BL)`` block, coalesced along ``lo``); at each level the block is
viewed as ``(2^k, 2, N/2^(k+1), BL)`` and split into the pairs' two halves (register and
shared-memory shuffles that Triton plans; ``tl.gather`` compiled to code quadratic in ``N``).

Coefficients. Every level's 2×2 matrices, untied, as ``(n, 4, D/2)`` float32 tensors
``[a, b, c, d]`` per pair ``blk·(L/2) + j`` (the pair order of :class:`ButterflyFactor`):
``y_u = a·x_u + b·x_v``, ``y_v = c·x_u + d·x_v``. The inverse uses the inverse matrices' entries and
the levels in reverse order.

Backward. The layer keeps its output, not its input: walking the levels backwards, each level's input
is recomputed from its output with the inverse matrices (the layer is invertible), then
``∂x = Mᵀ ∂y`` and ``∂[a, b, c, d] = [∂y_u·x_u, ∂y_u·x_v, ∂y_v·x_u, ∂y_v·x_v]`` per row; the per-row
coefficient gradients (``(B, n, 4, D/2)``) are summed by torch (deterministic, no atomics).
The log-determinant depends only on the parameters (``Σ s₁ + s₂``) and stays in torch.

A layer of more than ``MAX_LEVELS`` levels runs as a few launches over consecutive level groups
(:func:`level_groups`), each saving its output for the backward: a 14-level program took minutes
to compile and holds 16,384 elements per program.

Runs compiled on CUDA; on the CPU through Triton's interpreter (tests, debugging; slow).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

try:  # Triton ships with torch's Linux CUDA wheels; without it the layer keeps its PyTorch code
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = tl = None

MAX_VECTOR = 16384  # elements a program holds (N · BL)
MAX_LEVELS = 12  # levels per launch: compiling 12 takes ~15 s, 14 about 4.5 minutes (sm_90, once per shape)


def triton_available() -> bool:
    """Whether the Triton package imports (it ships with torch on Linux CUDA builds)."""
    return tl is not None and hasattr(tl, "split") and hasattr(tl, "permute")


def _levels_fn(x_ptr, out_ptr, coef_ptr, icoef_ptr, gy_ptr, gcoef_ptr, D, R, N: tl.constexpr, LEVELS: tl.constexpr,  # noqa: ANN001, ANN201
               BL: tl.constexpr, REVERSE: tl.constexpr, BACKWARD: tl.constexpr):
    """Apply the levels to ``x`` into ``out`` (forward, or inverse with the inverse matrices and ``REVERSE``);
    with ``BACKWARD``, ``x`` is the layer's output, ``gy`` its gradient, and ``out`` gets the input's gradient
    while ``gcoef`` gets the row's coefficient gradients (the levels then run in reverse)."""
    row, hi, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = tl.arange(0, N)[:, None]
    lo = tile * BL + tl.arange(0, BL)[None, :]
    mask = (lo < R) & (t < N)
    offs = row.to(tl.int64) * D + hi * N * R + t * R + lo
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        g = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    pairs = D // 2
    # Level k: 2**k blocks of N // 2**(k+1) pairs (t, t + N // 2**(k+1)). Shapes are written inline:
    # a name assigned in a static loop is no longer a compile-time constant.
    for k in tl.static_range(LEVELS - 1 if REVERSE else 0, -1 if REVERSE else LEVELS, -1 if REVERSE else 1):
        u, v = tl.split(tl.permute(tl.reshape(x, (2**k, 2, N // 2 ** (k + 1), BL)), (0, 2, 3, 1)))
        pair = ((hi * 2**k + tl.arange(0, 2**k)[:, None, None]) * (N // 2 ** (k + 1) * R)
                + tl.arange(0, N // 2 ** (k + 1))[None, :, None] * R + lo[None, :, :])
        pmask = (pair >= 0) & (lo[None, :, :] < R)
        at = coef_ptr + k * 4 * pairs + pair
        a = tl.load(at, mask=pmask, other=0.0)
        b = tl.load(at + pairs, mask=pmask, other=0.0)
        c = tl.load(at + 2 * pairs, mask=pmask, other=0.0)
        d = tl.load(at + 3 * pairs, mask=pmask, other=0.0)
        if BACKWARD:  # (u, v) is this level's output; recompute its input, then the gradients
            gu, gv = tl.split(tl.permute(tl.reshape(g, (2**k, 2, N // 2 ** (k + 1), BL)), (0, 2, 3, 1)))
            iat = icoef_ptr + k * 4 * pairs + pair
            xu = tl.load(iat, mask=pmask, other=0.0) * u + tl.load(iat + pairs, mask=pmask, other=0.0) * v
            xv = tl.load(iat + 2 * pairs, mask=pmask, other=0.0) * u + tl.load(iat + 3 * pairs, mask=pmask, other=0.0) * v
            gat = gcoef_ptr + row.to(tl.int64) * (LEVELS * 4 * pairs) + k * 4 * pairs + pair
            tl.store(gat, gu * xu, mask=pmask)
            tl.store(gat + pairs, gu * xv, mask=pmask)
            tl.store(gat + 2 * pairs, gv * xu, mask=pmask)
            tl.store(gat + 3 * pairs, gv * xv, mask=pmask)
            x = tl.reshape(tl.permute(tl.join(xu, xv), (0, 3, 1, 2)), (N, BL))
            g = tl.reshape(tl.permute(tl.join(a * gu + c * gv, b * gu + d * gv), (0, 3, 1, 2)), (N, BL))  # Mᵀ ∂y
        else:
            x = tl.reshape(tl.permute(tl.join(a * u + b * v, c * u + d * v), (0, 3, 1, 2)), (N, BL))
    if BACKWARD:
        tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + offs, x.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The kernel, compiled for CUDA or run by Triton's interpreter (CPU tensors)."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_levels_fn)
    return triton.jit(_levels_fn)


def _geometry(levels: int, offset: int, d: int) -> tuple[int, int, int, tuple[int, int]]:
    """``(N, R, BL, grid axes 1 and 2)`` for a layer of ``levels`` levels from level ``offset`` on ``D = d``."""
    n_vec, parts = 1 << levels, 1 << offset
    r = d // (parts * n_vec)
    bl = min(1 << max(0, math.ceil(math.log2(r))), max(1, MAX_VECTOR // n_vec), 64)
    return n_vec, r, bl, (parts, -(-r // bl))


def _launch(x: Tensor, out: Tensor, coef: Tensor, levels: int, offset: int, reverse: bool,
            icoef: Tensor | None = None, gy: Tensor | None = None, gcoef: Tensor | None = None) -> None:
    b, d = x.shape
    n_vec, r, bl, tail = _geometry(levels, offset, d)
    backward = gy is not None
    _kernel(not x.is_cuda)[(b, *tail)](
        x, out, coef, icoef if backward else coef, gy if backward else x, gcoef if backward else coef, d, r,
        N=n_vec, LEVELS=levels, BL=bl, REVERSE=reverse, BACKWARD=backward,
        **({"num_warps": 8} if x.is_cuda and n_vec * bl >= 4096 else {}))


class _ButterflyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, coef: Tensor, icoef: Tensor | None, levels: int, offset: int) -> Tensor:  # noqa: ANN001
        x = x.contiguous()
        y = torch.empty_like(x)
        _launch(x, y, coef, levels, offset, reverse=False)
        ctx.save_for_backward(y, coef, icoef)
        ctx.levels, ctx.offset = levels, offset
        return y

    @staticmethod
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        y, coef, icoef = ctx.saved_tensors
        gx = torch.empty_like(y)
        gcoef = torch.empty(y.shape[0], ctx.levels, 4, y.shape[1] // 2, device=y.device, dtype=torch.float32)
        _launch(y, gx, coef, ctx.levels, ctx.offset, reverse=True, icoef=icoef, gy=gy.contiguous(), gcoef=gcoef)
        return gx, gcoef.sum(0), None, None, None


def kernel_errors() -> tuple[type[BaseException], ...]:
    """What a kernel that cannot be built on this machine raises (compilation, resources, ptxas)."""
    if triton is None:
        return ()
    base = getattr(triton, "TritonError", None)
    if base is not None:
        return (base,)
    from triton.compiler.errors import CompilationError

    return (CompilationError,)


def level_groups(levels: int, max_levels: int | None = None) -> list[tuple[int, int]]:
    """``(first, count)`` of the launches a layer of ``levels`` levels takes: as few as ``max_levels`` allows,
    as even as possible (levels ``first … first+count−1`` of a layer are themselves a butterfly layer whose
    offset is the layer's plus ``first``)."""
    n = -(-levels // (max_levels or MAX_LEVELS))
    sizes = [levels // n + (i < levels % n) for i in range(n)]
    return [(sum(sizes[:i]), size) for i, size in enumerate(sizes)]


def butterfly_forward(x: Tensor, coef: Tensor, icoef: Tensor | None, levels: int, offset: int) -> Tensor:
    """All levels forward on ``x`` ``(B, D)``; differentiable in ``x`` and ``coef`` (``(levels, 4, D/2)`` float32).
    The backward needs the inverse matrices ``icoef`` (``None`` where no gradient will be taken)."""
    return _ButterflyFunction.apply(x, coef, None if icoef is None else icoef.detach(), levels, offset)


def butterfly_inverse(y: Tensor, icoef: Tensor, levels: int, offset: int) -> Tensor:
    """All levels inverted on ``y`` ``(B, D)`` (the inverse matrices, levels in reverse order); not differentiable."""
    y = y.contiguous()
    x = torch.empty_like(y)
    _launch(y, x, icoef.detach(), levels, offset, reverse=True)
    return x
