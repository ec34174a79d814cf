"""Invertible layers. Each maps data→latent with ``forward(x) -> (z, logdet)`` and back with ``inverse``."""

from .butterfly import Butterfly, ButterflyFactor, max_levels
from .base import Bijector, Flatten, Sequential, standard_normal_log_prob, sum_except_batch
from .coupling import AffineCoupling, RealNVPCoupling, checkerboard
from .linear import InvConv1x1, InvConv1x1LU
from .multiscale import GaussianSplit, MultiScale
from .normalization import ActNorm
from .preprocess import Logit
from .reshape import Squeeze, Squeeze1d, squeeze2d, unsqueeze2d

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Bijector",
    "Butterfly",
    "ButterflyFactor",
    "Flatten",
    "GaussianSplit",
    "InvConv1x1",
    "InvConv1x1LU",
    "Logit",
    "MultiScale",
    "RealNVPCoupling",
    "Sequential",
    "Squeeze",
    "Squeeze1d",
    "checkerboard",
    "max_levels",
    "squeeze2d",
    "standard_normal_log_prob",
    "sum_except_batch",
    "unsqueeze2d",
]
