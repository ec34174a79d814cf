"""Invertible layers. Each maps data→latent with ``forward(x) -> (z, logdet)`` and back with ``inverse``."""

from .butterfly import Butterfly, ButterflyFactor, max_levels
from .base import Bijector, Flatten, Sequential, data_init, standard_normal_log_prob, sum_except_batch
from .coupling import AffineCoupling, RealNVPCoupling, checkerboard
from .linear import InvConv1x1, InvConv1x1LU, Pointwise
from .marginal import Permutation, YeoJohnson
from .mixture import InverseOptions, MixtureCDFCoupling, mixture_inverse_cdf, mixture_log_cdf, mixture_log_pdf, mixture_logit_cdf
from .multiscale import GaussianSplit, MultiScale
from .normalization import ActNorm, GaussianWhitening, PositionNorm
from .preprocess import Logit, Sigmoid
from .reshape import ColumnMerge, ColumnSplit, Squeeze, Squeeze1d, SwapHalves, squeeze2d, unsqueeze2d

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Bijector",
    "Butterfly",
    "ButterflyFactor",
    "ColumnMerge",
    "ColumnSplit",
    "Flatten",
    "GaussianSplit",
    "GaussianWhitening",
    "InvConv1x1",
    "InvConv1x1LU",
    "InverseOptions",
    "Logit",
    "MixtureCDFCoupling",
    "MultiScale",
    "Permutation",
    "Pointwise",
    "PositionNorm",
    "RealNVPCoupling",
    "Sequential",
    "Sigmoid",
    "Squeeze",
    "Squeeze1d",
    "SwapHalves",
    "YeoJohnson",
    "checkerboard",
    "data_init",
    "max_levels",
    "mixture_inverse_cdf",
    "mixture_log_cdf",
    "mixture_log_pdf",
    "mixture_logit_cdf",
    "squeeze2d",
    "standard_normal_log_prob",
    "sum_except_batch",
    "unsqueeze2d",
]
