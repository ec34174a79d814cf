"""Conditioning networks used inside couplings."""

from .conv import GlowConvNet, ZeroConv2d
from .flowpp import ContextNet, DataInitConv2d, FlowppConditioner
from .mlp import MLP

__all__ = ["ContextNet", "DataInitConv2d", "FlowppConditioner", "GlowConvNet", "MLP", "ZeroConv2d"]
