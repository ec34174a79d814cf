"""Data-initialised affine normalisation: Glow's per-channel ActNorm, Flow++'s per-position Norm and full-covariance whitening."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..moments import Reduce, moments
from .base import Bijector


def _channel_view(x: Tensor, v: Tensor) -> Tensor:
    """Reshape a per-channel vector ``(C,)`` to broadcast against ``x`` of shape ``(B, C, ...)``."""
    return v.view(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(Bijector):
    """``z = (x + loc) · exp(log_scale)`` per channel.

    Works on ``(B, C)`` vectors and ``(B, C, H, W)`` images. Data-initialised (:func:`data_init`):
    ``loc`` and ``log_scale`` are set so the first batch's output has zero mean and unit variance
    per channel. ``logdet = (numel per channel) · Σ_c log_scale_c``.
    """

    def __init__(self, num_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(num_features))
        self.log_scale = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps

    REDUCIBLE_INIT = True  # from moments: a data-parallel job sums them over its ranks

    @torch.no_grad()
    def initialize(self, x: Tensor, reduce: Reduce | None = None) -> None:
        dims = tuple(d for d in range(x.dim()) if d != 1)
        if reduce is None:
            mean, std = x.mean(dim=dims), x.std(dim=dims, unbiased=False)
        else:
            mean, var = moments(x, dims, reduce)
            std = var.sqrt()
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def _positions(self, x: Tensor) -> int:
        return x[0, 0].numel()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x + _channel_view(x, self.loc)) * _channel_view(x, self.log_scale.exp())
        logdet = self.log_scale.sum() * self._positions(x)
        return z, logdet.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * _channel_view(z, (-self.log_scale).exp()) - _channel_view(z, self.loc)


class PositionNorm(Bijector):
    """Flow++'s Norm: ``z = g ⊙ x + b`` with ``g, b`` of the full per-example shape (per position and channel).

    Data-initialised (:func:`data_init`): ``g = 1/sqrt(var + 1e-8)``, ``b = −mean·g`` over the
    batch axis only. ``g`` is floored at 1e-10. ``logdet = Σ log g`` per sample.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(shape))
        self.b = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    REDUCIBLE_INIT = True

    @torch.no_grad()
    def initialize(self, x: Tensor, reduce: Reduce | None = None) -> None:
        mean, var = moments(x, (0,), reduce)
        scale = torch.rsqrt(var + 1e-8)
        self.g.copy_(scale)
        self.b.copy_(-mean * scale)
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        g = self.g.clamp(min=1e-10)
        return x * g + self.b, torch.log(g).sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return (z - self.b) / self.g.clamp(min=1e-10)


def shrunk_covariance(x: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 − α) S + α (tr S / D) I`` for the (biased) sample covariance ``S`` of ``x (N, D)``, float64."""
    s = np.atleast_2d(np.cov(x, rowvar=False, bias=True))
    return (1 - alpha) * s + alpha * np.trace(s) / len(s) * np.eye(len(s))


def gaussian_log_likelihood(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> float:
    """``Σ_n log N(x_n; mean, cov)`` in nats, float64; ``-inf`` when ``cov`` is not positive definite."""
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return -math.inf
    w = np.linalg.solve(chol, (x - mean).T)
    return float(-0.5 * (w**2).sum() - len(x) * (np.log(np.diag(chol)).sum() + 0.5 * len(mean) * math.log(2 * math.pi)))


def cv_shrinkage(x: np.ndarray, grid: tuple[float, ...], folds: int) -> float:
    """The shrinkage intensity of ``grid`` with the highest ``folds``-fold held-out Gaussian log-likelihood on ``x (N, D)``.

    Folds are interleaved rows (``n mod folds``); fewer than ``2·folds`` rows: the largest intensity.
    """
    if len(x) < 2 * folds:
        return max(grid)
    fold = np.arange(len(x)) % folds
    def held_out(alpha: float) -> float:
        return sum(gaussian_log_likelihood(x[fold == f], x[fold != f].mean(0), shrunk_covariance(x[fold != f], alpha))
                   for f in range(folds))
    return max(grid, key=held_out)


class GaussianWhitening(Bijector):
    """``z = W (x − μ)`` over the flattened example, ``W = L⁻¹`` for the Cholesky factor ``L`` of a covariance.

    Data-initialised (:func:`data_init`): ``μ`` and the covariance are estimated from the batch
    (Ledoit-Wolf shrinkage, so a batch smaller than ``D`` still gives a positive-definite
    estimate), in float64. ``W`` is lower triangular in the flattened order, so ``z_i`` is the
    standardised innovation of ``x_i`` given ``x_1 … x_{i−1}`` (for ``(C, T)`` windows: each
    channel's sample given its own past and the earlier channels) and stays where ``x_i`` was:
    what follows still sees time as time. ``logdet = Σ_i log W_ii`` per sample.

    At initialisation the flow built on top starts as the full-covariance Gaussian; the layers
    after it model what is not Gaussian. ``μ`` and ``W`` are buffers, fixed after the
    initialisation: ``D(D+1)/2`` numbers estimated in closed form, which gradient steps would only
    overfit. Needs a large initialisation batch (``train.init_batch``), ideally several times ``D``.

    ``shrinkage="cv"`` estimates ``(1 − α) S + α (tr S / D) I`` instead, with the sample
    covariance ``S`` and the intensity ``α`` of :data:`SHRINKAGE_GRID` whose Gaussian has the
    highest held-out likelihood in a :data:`CV_FOLDS`-fold split of the batch. Ledoit-Wolf's
    intensity minimises a Frobenius loss, not the likelihood: on standardised tabular features it
    can shrink several times too much (see :func:`cv_shrinkage`).
    """

    SHRINKAGE_GRID = (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.2, 0.4, 0.7, 1.0)
    CV_FOLDS = 5

    def __init__(self, shape: tuple[int, ...], shrinkage: Literal["ledoit-wolf", "cv"] = "ledoit-wolf") -> None:
        super().__init__()
        self.shrinkage = shrinkage
        d = math.prod(shape)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("weight", torch.eye(d))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        from sklearn.covariance import ledoit_wolf

        flat = x.reshape(x.shape[0], -1).detach().to("cpu", torch.float64).numpy()
        if self.shrinkage == "cv":
            cov = shrunk_covariance(flat, cv_shrinkage(flat, self.SHRINKAGE_GRID, self.CV_FOLDS))
        else:
            cov, _ = ledoit_wolf(flat)
        chol = torch.linalg.cholesky(torch.from_numpy(cov))
        eye = torch.eye(chol.shape[0], dtype=torch.float64)
        self.weight.copy_(torch.linalg.solve_triangular(chol, eye, upper=False))
        self.mean.copy_(torch.from_numpy(flat.mean(0)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = (x.reshape(x.shape[0], -1) - self.mean) @ self.weight.T
        logdet = torch.log(torch.diagonal(self.weight)).sum()
        return z.reshape(x.shape), logdet.expand(x.shape[0])

    def freeze(self) -> None:
        """Keep ``W⁻¹`` as a matrix (export: ONNX has no triangular solve); the inverse then multiplies by it."""
        self._inverse = torch.linalg.inv(self.weight)

    def inverse(self, z: Tensor) -> Tensor:
        flat = z.reshape(z.shape[0], -1)
        frozen = getattr(self, "_inverse", None)
        if frozen is not None:
            x = flat @ frozen.T + self.mean
        else:
            x = torch.linalg.solve_triangular(self.weight, flat.T, upper=False).T + self.mean
        return x.reshape(z.shape)
