"""Conditioning networks used inside couplings."""

from .conv import GlowConvNet, ZeroConv2d
from .mlp import MLP

__all__ = ["GlowConvNet", "MLP", "ZeroConv2d"]
