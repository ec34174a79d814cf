"""Convolutional conditioners for image couplings (Glow's three-layer CNN)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ZeroConv2d(nn.Module):
    """3×3 convolution initialised to zero, with a learned per-channel output scale ``exp(3·s)`` (Glow)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.log_scale = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) * torch.exp(self.log_scale * 3.0)


class GlowConvNet(nn.Module):
    """``conv3×3 → ReLU → conv1×1 → ReLU → ZeroConv3×3``: ``(B, C_in, H, W) -> (B, C_out, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            ZeroConv2d(hidden, out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
