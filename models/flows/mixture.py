"""Flow++'s logistic-mixture CDF coupling (Ho et al. 2019, §3.1) and the mixture math it needs.

With ``K`` components (mixture logits ``π``, means ``μ``, log-scales ``ℓ``, per element) the
mixture CDF is ``F(x) = Σ_k softmax(π)_k σ((x − μ_k) e^{−ℓ_k})``. The coupling maps each
transformed element ``x`` to

    y = e^{a} · σ⁻¹(F(x)) + b,        a = tanh(·) ∈ (−1, 1),

with ``log|dy/dx| = log f(x) − log F(x) − log(1 − F(x)) + a`` (nats, per element). Everything is
in log space: ``log F = logsumexp_k(log w_k + logsigmoid(z_k))``, ``log(1 − F)`` likewise with
``logsigmoid(−z_k)``, never ``log1p(−F)``. ``σ⁻¹(F) = log F − log(1 − F)``.

The inverse solves ``σ⁻¹(F(x)) = (y − b) e^{−a}`` elementwise (float32 by default, float64 as an option), comparing in logit
space (so no clipping of ``F*`` to ``(0, 1)`` is needed), by bisection on the bracket
``[min_k μ_k − c·S, max_k μ_k + c·S]`` with ``S = Σ_k e^{ℓ_k}``; or by Newton steps kept inside
that (shrinking) bracket, falling back to bisection whenever a step leaves it or fails to halve
the previous step (the safeguard of Numerical Recipes' ``rtsafe``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Bijector, sum_except_batch
from ..precision import conditioned

MIN_LOG_SCALE = -7.0


@dataclass(frozen=True)
class InverseOptions:
    """How the mixture CDF is inverted: ``method``, bracket half-width factor ``c``, tolerance ``tol`` (in x), iteration cap.

    An exported (traced) graph cannot stop early, so it unrolls ``min(max_iter, unrolled)``
    iterations: 64 halvings take any bracket narrower than 2¹³ to float64 resolution.
    """

    method: Literal["bisection", "newton"] = "bisection"
    bracket: float = 200.0
    tol: float = 1e-12
    max_iter: int = 200
    unrolled: int = 64


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _converged(width: Tensor, tol: float) -> bool:
    """Every element's bracket (or step) within ``tol`` (reads the value on the host)."""
    return bool(width.max() <= tol) if width.numel() else True


def _softplus(z: Tensor) -> Tensor:
    """``log(1 + e^z)``; in exported graphs as ``relu(z) + log1p(e^{−|z|})`` (ONNX Runtime has no float64 Softplus)."""
    if _tracing():
        return torch.relu(z) + torch.log1p(torch.exp(-z.abs()))
    return F.softplus(z)


def _logsigmoid(z: Tensor) -> Tensor:
    return -_softplus(-z)


def mixture_log_cdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> tuple[Tensor, Tensor]:
    """``(log F(x), log(1 − F(x)))``; ``x`` is ``(...)``, parameters ``(..., K)``."""
    log_w = F.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return torch.logsumexp(log_w + _logsigmoid(z), -1), torch.logsumexp(log_w + _logsigmoid(-z), -1)


def mixture_log_pdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """``log f(x)``, the mixture density: ``logsumexp_k(log w_k + z_k − ℓ_k − 2 softplus(z_k))``."""
    log_w = F.log_softmax(logits, dim=-1)
    z = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return torch.logsumexp(log_w + z - log_scales - 2.0 * _softplus(z), -1)


def mixture_logit_cdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """``σ⁻¹(F(x)) = log F − log(1 − F)``, monotone increasing in ``x``."""
    log_f, log_1mf = mixture_log_cdf(x, logits, means, log_scales)
    return log_f - log_1mf


def _early_exit(ref: Tensor) -> bool:
    """Stop iterating once converged: eager and on the CPU only. Checking needs the host to read a
    device value each iteration, which on a GPU costs more than the iterations it saves (and a
    captured or exported graph cannot branch), so there the solve runs its fixed iteration count."""
    return not _tracing() and ref.device.type == "cpu"


@torch.no_grad()
def mixture_inverse_cdf(
    target_logit: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor, options: InverseOptions = InverseOptions(),
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, int]:
    """Solve ``σ⁻¹(F(x)) = target_logit`` for ``x``, elementwise; returns ``(x, iterations)`` in ``dtype``.

    ``dtype`` defaults to the target's (float32 or float64). ``target_logit`` is ``(...)``, the
    parameters ``(..., K)``. No gradient flows through the solve. Bisection halves the bracket
    each step, so ``options.unrolled`` (64) steps take any bracket narrower than 2¹³ to float64
    resolution (float32's after about 40); that fixed count is what runs off the CPU and in
    exported graphs. On the CPU the loop exits once the bracket is narrower than ``2·tol`` or
    stops shrinking (float32 reaches its resolution long before 1e-12).
    """
    dtype = dtype or (torch.float64 if target_logit.dtype == torch.float64 else torch.float32)
    t = target_logit.to(dtype)
    logits, means, log_scales = logits.to(dtype), means.to(dtype), log_scales.to(dtype)
    spread = options.bracket * torch.exp(log_scales).sum(-1)
    lo = means.min(-1).values - spread
    hi = means.max(-1).values + spread
    early = _early_exit(t)
    iterations = options.max_iter if early else min(options.max_iter, options.unrolled)
    if options.method == "bisection":
        for i in range(1, iterations + 1):
            mid = 0.5 * (lo + hi)
            above = mixture_logit_cdf(mid, logits, means, log_scales) > t
            stalled = (mid == lo) | (mid == hi)
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
            if early and (_converged(hi - lo, 2 * options.tol) or bool(stalled.all())):
                break
        return 0.5 * (lo + hi), i
    x = 0.5 * (lo + hi)
    last_step = hi - lo
    for i in range(1, iterations + 1):
        log_f, log_1mf = mixture_log_cdf(x, logits, means, log_scales)
        g = log_f - log_1mf - t
        slope = torch.exp(mixture_log_pdf(x, logits, means, log_scales) - log_f - log_1mf)
        above = g > 0
        hi = torch.where(above, x, hi)
        lo = torch.where(above, lo, x)
        newton = x - g / slope
        # Newton only while it stays inside the bracket and at least halves the step (rtsafe's rule).
        use_newton = (newton > lo) & (newton < hi) & torch.isfinite(newton) & ((2 * g).abs() <= (last_step * slope).abs())
        new = torch.where(use_newton, newton, 0.5 * (lo + hi))
        last_step = (new - x).abs()
        stalled = new == x
        x = new
        if early and (_converged(last_step, options.tol) or bool(stalled.all())):
            break
    return x, i


class MixtureCDFCoupling(Bijector):
    """Flow++ coupling on ``(B, 2C, H, W)``: the first ``C`` channels condition, the last ``C`` are transformed.

    ``net(x_a, context) -> (B, C·(2 + 3K), H, W)`` gives, per transformed element, the raw
    scale, the shift and ``K`` mixture logits, means and log-scales (clamped at −7). With
    ``components = 0`` the coupling is affine, ``y = e^{a} x + b`` (the paper's ablation).
    ``float64`` evaluates the mixture (CDF, pdf and inverse) in float64; the default is float32, in
    which the official Flow++ trains (``flow_training.py``: ``tf.float32``).
    """

    def __init__(self, net: nn.Module, components: int, float64: bool = False, inverse: InverseOptions = InverseOptions()) -> None:
        super().__init__()
        self.net = net
        self.components = components
        self.float64 = float64
        self.inverse_options = inverse
        self.last_inverse_iterations = 0

    def _params(self, a: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        k = self.components
        h = conditioned(self.net, a, context)
        b, _, height, width = h.shape
        h = h.view(b, a.shape[1], 2 + 3 * k, height, width).permute(0, 1, 3, 4, 2)
        scale, shift = torch.tanh(h[..., 0]), h[..., 1]
        logits, means = h[..., 2 : 2 + k], h[..., 2 + k : 2 + 2 * k]
        log_scales = h[..., 2 + 2 * k :].clamp(min=MIN_LOG_SCALE)
        return scale, shift, logits, means, log_scales

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        c = x.shape[1] // 2
        a, xb = x[:, :c], x[:, c:]
        scale, shift, logits, means, log_scales = self._params(a, context)
        if self.components:
            dtype = torch.float64 if self.float64 else xb.dtype
            xd = xb.to(dtype)
            mix = (logits.to(dtype), means.to(dtype), log_scales.to(dtype))
            log_f, log_1mf = mixture_log_cdf(xd, *mix)
            y = (log_f - log_1mf).to(xb.dtype)
            logdet = (mixture_log_pdf(xd, *mix) - log_f - log_1mf).to(xb.dtype) + scale
        else:
            y, logdet = xb, scale
        y = y * torch.exp(scale) + shift
        return torch.cat([a, y], 1), sum_except_batch(logdet)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        c = z.shape[1] // 2
        a, yb = z[:, :c], z[:, c:]
        scale, shift, logits, means, log_scales = self._params(a, context)
        target = (yb - shift) * torch.exp(-scale)
        if self.components:
            dtype = torch.float64 if self.float64 else None
            xb, self.last_inverse_iterations = mixture_inverse_cdf(target, logits, means, log_scales, self.inverse_options, dtype)
            if torch.is_grad_enabled():
                xb = self._implicit_gradient(xb, target, logits, means, log_scales)
            target = xb.to(yb.dtype)
        return torch.cat([a, target], 1)

    @staticmethod
    def _implicit_gradient(x: Tensor, target: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
        """One Newton step with the root and slope held constant: same value, exact gradients
        ``∂x/∂t = 1/G'(x)``, ``∂x/∂θ = −(∂G/∂θ)/G'(x)`` (implicit function theorem, ``G = σ⁻¹∘F``)."""
        mix = (logits.to(x.dtype), means.to(x.dtype), log_scales.to(x.dtype))
        log_f, log_1mf = mixture_log_cdf(x, *mix)
        slope = torch.exp(mixture_log_pdf(x, *mix) - log_f - log_1mf).detach()
        return x - (log_f - log_1mf - target.to(x.dtype)) / slope


__all__ = [
    "InverseOptions",
    "MixtureCDFCoupling",
    "mixture_inverse_cdf",
    "mixture_log_cdf",
    "mixture_log_pdf",
    "mixture_logit_cdf",
]
