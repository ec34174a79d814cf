"""Per-feature monotone maps fitted to each column's marginal, for tabular records ``(B, D)``.

:class:`YeoJohnson` makes each column roughly Gaussian and on a common scale before any layer
mixes columns: real CSVs hold columns on very different scales (areas in the thousands beside
ratios near 0.1), skewed and heavy-tailed columns, and constant columns.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .base import Bijector

LAMBDA_RANGE = (-2.0, 4.0)  # Yeo-Johnson exponents are clipped here: beyond it a handful of records decide the fit
_NEAR = 1e-6  # |λ| (or |λ − 2|) below this: the logarithmic branch


def _expm1(x: Tensor) -> Tensor:
    """``eˣ − 1`` as Kahan's ``(u − 1)·x / log u`` with ``u = eˣ``: accurate near 0 like ``torch.expm1``, and made of
    operators ONNX has (it has no ``expm1``)."""
    u = torch.exp(x)
    safe = torch.where((u == 1) | torch.isinf(u), torch.full_like(u, 2.0), u)
    return torch.where(u == 1, x, torch.where(torch.isinf(u), u, (safe - 1) * x / torch.log(safe)))


def yeo_johnson(u: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """The Yeo-Johnson map ``ψ_λ(u)`` and ``log ψ'_λ(u)``, elementwise, with ``lam`` broadcast against ``u``.

    ``ψ(u) = ((1 + u)^λ − 1)/λ`` for ``u ≥ 0`` (``log(1 + u)`` at ``λ = 0``) and
    ``−((1 − u)^{2−λ} − 1)/(2 − λ)`` for ``u < 0`` (``−log(1 − u)`` at ``λ = 2``);
    ``log ψ'(u) = (λ − 1)·sign(u)·log(1 + |u|)``. Strictly increasing for every ``λ``.
    """
    pos = u >= 0
    a = torch.where(pos, torch.log1p(u.clamp(min=0)), torch.log1p((-u).clamp(min=0)))  # log(1 + |u|), d/du ≠ 0 at 0
    p = torch.where(pos, lam, 2 - lam)  # the exponent of the branch
    safe = torch.where(p.abs() < _NEAR, torch.ones_like(p), p)
    mag = torch.where(p.abs() < _NEAR, a, _expm1(p * a) / safe)  # ((1 + |u|)^p − 1)/p
    y = torch.where(pos, mag, -mag)
    return y, (lam - 1) * torch.where(pos, a, -a)


def yeo_johnson_inverse(y: Tensor, lam: Tensor) -> Tensor:
    """``ψ_λ⁻¹(y)`` elementwise (``ψ`` keeps the sign, so the branch follows ``y``'s sign)."""
    pos = y >= 0
    p = torch.where(pos, lam, 2 - lam)
    safe = torch.where(p.abs() < _NEAR, torch.ones_like(p), p)
    a = torch.where(p.abs() < _NEAR, y.abs(), torch.log1p((p * y.abs()).clamp(min=-1 + 1e-12)) / safe)
    mag = _expm1(a)
    return torch.where(pos, mag, -mag)


def fit_lambda(u: np.ndarray) -> float:
    """Maximum-likelihood Yeo-Johnson exponent of one column (scipy), clipped to :data:`LAMBDA_RANGE`."""
    from scipy import stats

    if np.ptp(u) == 0:
        return 1.0
    return float(np.clip(stats.yeojohnson_normmax(u.astype(np.float64)), *LAMBDA_RANGE))


class YeoJohnson(Bijector):
    """``z_j = (ψ_{λ_j}((x_j − c_j)/s_j) − m_j) / σ_j`` per feature ``j`` of ``(B, D)`` records.

    Data-initialised (:func:`models.flows.data_init`), in float64: ``c`` the column medians,
    ``s`` the standard deviations, ``λ`` the maximum-likelihood Yeo-Johnson exponents of the
    centred columns (Yeo and Johnson 2000), ``m`` and ``σ`` the mean and standard deviation of the
    result. Centring at the median makes the map location-invariant (°C and K give the same
    model); the exponent then corrects skew on each side of it. A constant column (a column every
    training record shares) keeps ``λ = 1`` and a scale of ``CONSTANT_SCALE · (1 + |c|)``: its
    density is a narrow spike, so any other value scores as far out. All are buffers, fixed after
    initialisation: ``4D`` numbers in closed form.

    ``logdet = Σ_j [log ψ'(u_j) − log s_j − log σ_j]`` per sample, in nats.
    """

    CONSTANT_SCALE = 1e-3

    def __init__(self, features: int) -> None:
        super().__init__()
        for name, value in (("center", 0.0), ("scale", 1.0), ("lam", 1.0), ("mean", 0.0), ("std", 1.0)):
            self.register_buffer(name, torch.full((features,), value))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        v = x.detach().to("cpu", torch.float64).numpy()
        center = np.median(v, 0)
        sd = v.std(0)
        constant = sd <= 1e-12 * (1 + np.abs(center))
        scale = np.where(constant, 1.0, sd)
        u = (v - center) / scale
        lam = np.array([1.0 if c else fit_lambda(u[:, j]) for j, c in enumerate(constant)])
        y = yeo_johnson(torch.from_numpy(u), torch.from_numpy(lam))[0].numpy()
        std = np.where(constant, self.CONSTANT_SCALE * (1 + np.abs(center)), y.std(0))
        for name, value in (("center", center), ("scale", scale), ("lam", lam), ("mean", y.mean(0)), ("std", std)):
            getattr(self, name).copy_(torch.from_numpy(np.asarray(value)))
        self.initialized.fill_(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y, log_dpsi = yeo_johnson((x - self.center) / self.scale, self.lam)
        z = (y - self.mean) / self.std
        logdet = log_dpsi.sum(1) - (torch.log(self.scale).sum() + torch.log(self.std).sum())
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        return yeo_johnson_inverse(z * self.std + self.mean, self.lam) * self.scale + self.center


class Permutation(Bijector):
    """A fixed permutation of the features of ``(B, D)`` records (drawn from ``seed``); log-det 0."""

    def __init__(self, features: int, seed: int) -> None:
        super().__init__()
        order = torch.randperm(features, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("order", order)
        self.register_buffer("undo", torch.argsort(order))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.order], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z[:, self.undo]


__all__ = ["LAMBDA_RANGE", "Permutation", "YeoJohnson", "fit_lambda", "yeo_johnson", "yeo_johnson_inverse"]
