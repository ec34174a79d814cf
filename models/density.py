"""``DensityModel``: the contract between ``models/`` and ``service/``.

``log_prob(x)`` (nats per sample, data space in), ``bits_per_dim(x)``, ``sample(n, temperature)``
and ``spec``. For discrete data the log-probability is the dequantization bound
``log p(x + u) − log q(u|x)``, i.e. the log-probability of the discrete value ``x``
(the density integrated over its unit bin), so a uniform model scores ``D · log L``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from . import sampling, seeding
from .dequantization import UniformDequantizer
from .flows import Bijector, standard_normal_log_prob
from .spec import DataSpec


class DensityModel(nn.Module):
    """A flow from data to a standard normal latent, plus dequantization for discrete data."""

    def __init__(self, flow: Bijector, spec: DataSpec, dequantizer: nn.Module | None = None) -> None:
        super().__init__()
        self.flow = flow
        self.spec = spec
        if dequantizer is None and spec.discrete:
            dequantizer = UniformDequantizer()
        elif dequantizer is None and spec.discrete_features:
            dequantizer = UniformDequantizer(spec.discrete_features, spec.dims)
        self.dequantizer = dequantizer
        self.manifest = None  # set by ``models.artifacts.store.load``

    @property
    def device(self) -> torch.device:
        """Where the model's tensors are: its parameters', else its buffers' (a flow of fixed layers), else the CPU."""
        tensor = next(self.parameters(), None)
        if tensor is None:
            tensor = next(self.buffers(), None)
        return torch.device("cpu") if tensor is None else tensor.device

    def noise(self, n: int, generator: torch.Generator | None = None, seed: int | None = None) -> Tensor | None:
        """Dequantization noise for ``n`` examples (``None`` for continuous data).

        Drawn on the model's device, or on ``generator``'s when one is given (a CPU generator keeps
        results reproducible across devices); from ``seed``: a CPU tensor.

        With ``seed``, the noise is :func:`models.seeding.dequantization_noise` of that seed, the
        same the service draws for a request's ``seed``; otherwise it comes from ``generator``.
        """
        if self.dequantizer is None:
            return None
        shape = (n, *self.spec.shape)
        if seed is not None:
            return torch.from_numpy(seeding.dequantization_noise(self.dequantizer.distribution, shape, seed))
        return self.dequantizer.noise(shape, generator=generator, device=None if generator is not None else self.device)

    def log_prob(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None,
                 seed: int | None = None) -> Tensor:
        """``(B, *shape) -> (B,)`` log-probability in nats (a lower bound for discrete data).

        ``noise`` is the dequantizer's input (drawn from ``seed``, else ``generator``, when omitted);
        passing it or a seed makes the result deterministic and independent of what else is in the
        batch, and equal to the service's answer for that seed.
        """
        x = x.to(self.device, torch.get_default_dtype() if not x.is_floating_point() else x.dtype)
        log_q = x.new_zeros(x.shape[0])
        if self.dequantizer is not None:
            if noise is None:
                noise = self.noise(x.shape[0], generator, seed)
            u, log_q = self.dequantizer(x, noise.to(x.device))
            x = x + u
        z, logdet = self.flow(x)
        return standard_normal_log_prob(z) + logdet - log_q

    def bits_per_dim(self, x: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``−log_prob / (D · ln 2)`` per sample, ``(B,)``."""
        return -self.log_prob(x, noise, generator) / (self.spec.dims * math.log(2))

    @torch.no_grad()
    def log_prob_iw(self, x: Tensor, samples: int, generator: torch.Generator | None = None, chunk: int = 256) -> Tensor:
        """Importance-weighted bound ``log (1/S) Σ_s p(x+u_s)/q(u_s|x)`` (nats, ``(B,)``), float64 log-sum-exp."""
        if self.dequantizer is None or samples <= 1:
            return self.log_prob(x, generator=generator)
        out = []
        for xi in x:
            terms = []
            for start in range(0, samples, chunk):
                k = min(chunk, samples - start)
                terms.append(self.log_prob(xi.unsqueeze(0).expand(k, *xi.shape), generator=generator).double())
            out.append(torch.logsumexp(torch.cat(terms), 0) - math.log(samples))
        return torch.stack(out).to(torch.get_default_dtype())

    def _valid_records(self, n: int, temperature: float, generator: torch.Generator | None, seed: int | None) -> np.ndarray:
        """``n`` valid records (:mod:`models.sampling`), latents from ``seed`` (per round) or ``generator``."""
        def latent(k: int, r: int) -> np.ndarray:
            if seed is not None:
                return seeding.latent(k, self.spec.dims, temperature, sampling.round_seed(seed, r))
            return (torch.randn(k, self.spec.dims, generator=generator) * temperature).numpy()

        return sampling.run(sampling.rejection(self.spec, n, latent),
                            lambda z: self.sample(len(z), 1.0, z=torch.from_numpy(z)).cpu().numpy())

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None, z: Tensor | None = None,
               seed: int | None = None) -> Tensor:
        """``n`` samples in data space, shape ``(n, *shape)``; integers in ``0..L−1`` for discrete data
        (and integers for a record's discrete features).

        Draws ``z ~ N(0, T² I)`` (``temperature`` T) unless ``z`` is given: from ``seed`` as the
        service does (:func:`models.seeding.latent`), else from ``generator``. Records without a
        given ``z`` are valid records (:mod:`models.sampling`: derived features computed, ranges
        enforced by rejection); with ``z`` the flow's inverse is returned as it is.
        """
        if z is None and sampling.needs_rejection(self.spec):
            return torch.from_numpy(self._valid_records(n, temperature, generator, seed))
        if z is None and seed is not None:
            z, temperature = torch.from_numpy(seeding.latent(n, self.spec.dims, temperature, seed)), 1.0
        if z is None:
            z = torch.randn(n, self.spec.dims, generator=generator, device=generator.device if generator is not None else self.device)
        x = self.flow.inverse((z * temperature).to(self.device))
        x = x.reshape(n, *self.spec.shape)
        if self.spec.discrete:
            x = torch.where(torch.isnan(x), torch.zeros_like(x), x).floor().clamp(0, self.spec.levels - 1)
        elif self.spec.discrete_features:
            k = self.spec.discrete_features
            x[:, k] = x[:, k].floor()
        return x
