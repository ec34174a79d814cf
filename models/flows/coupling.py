"""Affine coupling (RealNVP / Glow) with channel or checkerboard masks.

With ``x = (x_a, x_b)`` split by a mask, a network reads ``x_a`` and gives ``shift`` and a
raw scale; ``z_b = (x_b + shift) · s`` with Glow's ``s = sigmoid(raw + 2)``, ``z_a = x_a``.
``logdet = Σ_b log s`` per sample.

With ``soft_clamp = c`` the scale is ``s = exp(c · tanh(raw / c))`` instead: ``|log s| < c``,
and a network whose last layer starts at zero (:class:`models.nets.MLP`) starts the coupling
at the identity, so a flow whose earlier layers form a Gaussian starts as that Gaussian.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets import MLP, GlowConvNet
from .base import Bijector, channels_first, channels_last, sum_except_batch
from ..precision import conditioned


def checkerboard(h: int, w: int, parity: int) -> Tensor:
    """``(1, 1, H, W)`` mask with ones where ``(i + j) % 2 == parity``."""
    i = torch.arange(h).view(-1, 1)
    j = torch.arange(w).view(1, -1)
    return ((i + j) % 2 == parity).float().view(1, 1, h, w)


class AffineCoupling(Bijector):
    """Affine coupling on images ``(B, C, H, W)`` or vectors ``(B, D)``.

    ``mask="channel"`` conditions on the first (``parity=0``) or second channel half;
    ``mask="checkerboard"`` on the spatial checkerboard squares of the given parity
    (images only). The conditioner is Glow's CNN for images and an MLP for vectors.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        hidden: int,
        mask: Literal["channel", "checkerboard"] = "channel",
        parity: int = 0,
        depth: int = 2,
        soft_clamp: float | None = None,
    ) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.soft_clamp = soft_clamp
        self.mask_kind = mask
        self.parity = parity
        channels = shape[0]
        self.image = len(shape) == 3
        if mask == "checkerboard":
            if not self.image:
                raise ValueError("checkerboard masks need image inputs (C, H, W)")
            self.register_buffer("mask", checkerboard(shape[1], shape[2], parity))
            self.net = GlowConvNet(channels + 1, 2 * channels, hidden)
        else:
            if channels < 2:
                raise ValueError("a channel coupling needs at least 2 channels; squeeze first")
            self.n_a = channels // 2 if parity == 0 else channels - channels // 2
            n_b = channels - self.n_a
            if self.image:
                self.net = GlowConvNet(self.n_a, 2 * n_b, hidden)
            else:
                self.net = MLP(self.n_a, 2 * n_b, hidden, depth)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.parity == 0:
            return x[:, : self.n_a], x[:, self.n_a :]
        return x[:, -self.n_a :], x[:, : -self.n_a]

    def _join(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.cat([a, b], 1) if self.parity == 0 else torch.cat([b, a], 1)

    def _params(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        h = conditioned(self.net, cond)
        shift, raw = h[:, 0::2], h[:, 1::2]
        if self.soft_clamp is not None:
            return shift, self.soft_clamp * torch.tanh(raw / self.soft_clamp)
        log_s = F.logsigmoid(raw + 2.0)
        return shift, log_s

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.mask_kind == "checkerboard":
            m = self.mask.to(x.dtype)
            shift, log_s = self._params(torch.cat([x * m, m.expand(x.shape[0], 1, -1, -1)], 1))
            z = x * m + (1 - m) * (x + shift) * log_s.exp()
            return z, sum_except_batch((1 - m) * log_s)
        a, b = self._split(x)
        shift, log_s = self._params(a)
        return self._join(a, (b + shift) * log_s.exp()), sum_except_batch(log_s)

    def inverse(self, z: Tensor) -> Tensor:
        if self.mask_kind == "checkerboard":
            m = self.mask.to(z.dtype)
            shift, log_s = self._params(torch.cat([z * m, m.expand(z.shape[0], 1, -1, -1)], 1))
            return z * m + (1 - m) * (z * (-log_s).exp() - shift)
        a, b = self._split(z)
        shift, log_s = self._params(a)
        return self._join(a, b * (-log_s).exp() - shift)


class RealNVPCoupling(Bijector):
    """RealNVP coupling over channels of ``(B, C, T)`` (or ``(B, C)``), pointwise in time.

    Separate MLPs read the first ``C//2`` channels at each position: a scale net with tanh
    activations and a shift net with ReLU, each ``in → hidden → hidden → out``.
    ``z_b = x_b · exp(s) + t``, ``logdet = Σ s``.
    """

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.n_a = channels // 2
        n_b = channels - self.n_a

        def mlp(act: type[nn.Module]) -> nn.Sequential:
            last = nn.Linear(hidden, n_b)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            return nn.Sequential(nn.Linear(self.n_a, hidden), act(), nn.Linear(hidden, hidden), act(), last)

        self.scale_net, self.shift_net = mlp(nn.Tanh), mlp(nn.ReLU)

    def _params(self, a: Tensor) -> tuple[Tensor, Tensor]:
        h = channels_last(a)  # the MLPs read the channel vector at each position
        return channels_first(conditioned(self.scale_net, h)), channels_first(conditioned(self.shift_net, h))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.n_a], x[:, self.n_a :]
        s, t = self._params(a)
        return torch.cat([a, b * torch.exp(s) + t], 1), sum_except_batch(s)

    def inverse(self, z: Tensor) -> Tensor:
        a, b = z[:, : self.n_a], z[:, self.n_a :]
        s, t = self._params(a)
        return torch.cat([a, (b - t) * torch.exp(-s)], 1)
