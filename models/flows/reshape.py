"""Volume-preserving reshapes: 2×2 squeeze (space-to-depth), Flow++'s column split, half swaps."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Bijector


def squeeze2d(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, 4C, H/2, W/2)``."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def unsqueeze2d(x: Tensor) -> Tensor:
    """``(B, 4C, H, W) -> (B, C, 2H, 2W)``; inverse of :func:`squeeze2d`."""
    b, c, h, w = x.shape
    x = x.view(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, h * 2, w * 2)


class Squeeze(Bijector):
    """Space-to-depth by 2×2 blocks; log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"Squeeze needs even height and width, got {tuple(x.shape[2:])}")
        return squeeze2d(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return unsqueeze2d(z)


class Squeeze1d(Bijector):
    """Time into channels: ``(B, C, T) -> (B, 2C, T/2)``, i.e. a time-major ``(T, C)`` read as ``(T/2, 2C)``.

    New channel ``(t mod 2)·C + c`` at time ``t // 2``; log-det 0.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, t = x.shape
        if t % 2:
            raise ValueError(f"Squeeze1d needs an even number of time steps, got {t}")
        return x.view(b, c, t // 2, 2).permute(0, 3, 1, 2).reshape(b, 2 * c, t // 2), x.new_zeros(b)

    def inverse(self, z: Tensor) -> Tensor:
        b, c2, t2 = z.shape
        return z.view(b, 2, c2 // 2, t2).permute(0, 2, 3, 1).reshape(b, c2 // 2, t2 * 2)


def column_split(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, 2C, H, W/2)``: even columns in channels ``0..C−1``, odd in ``C..2C−1``."""
    b, c, h, w = x.shape
    return x.view(b, c, h, w // 2, 2).permute(0, 4, 1, 2, 3).reshape(b, 2 * c, h, w // 2)


def column_merge(z: Tensor) -> Tensor:
    """``(B, 2C, H, W/2) -> (B, C, H, W)``; inverse of :func:`column_split`."""
    b, c2, h, w2 = z.shape
    return z.view(b, 2, c2 // 2, h, w2).permute(0, 2, 3, 4, 1).reshape(b, c2 // 2, h, w2 * 2)


class ColumnSplit(Bijector):
    """Flow++'s "checkerboard" split (even/odd columns, as the official code does it), halves stacked on channels.

    ``(B, C, H, W) -> (B, 2C, H, W/2)``: channels ``0..C−1`` hold the even columns, ``C..2C−1`` the
    odd ones. Couplings then condition on the first half. Log-det 0.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[3] % 2:
            raise ValueError(f"ColumnSplit needs an even width, got {x.shape[3]}")
        return column_split(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return column_merge(z)


class ColumnMerge(Bijector):
    """Inverse of :class:`ColumnSplit`: ``(B, 2C, H, W/2) -> (B, C, H, W)``; log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return column_merge(x), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return column_split(z)


class SwapHalves(Bijector):
    """Exchange the two channel halves ``(x_a, x_b) -> (x_b, x_a)`` (Flow++'s TupleFlip); log-det 0."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1] // 2
        return torch.cat([x[:, c:], x[:, :c]], 1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return self.forward(z)[0]
