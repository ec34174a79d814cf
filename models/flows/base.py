"""The bijector contract shared by every invertible layer.

A bijector maps data to latent, ``forward(x) -> (z, logdet)``, where ``logdet`` is
``log |det ∂z/∂x|`` per sample, shape ``(B,)``, in nats; ``inverse(z) -> x`` undoes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..moments import Reduce


class Bijector(nn.Module):
    """An invertible map ``x ↦ z`` with a tractable log-determinant."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def _waiting(module: nn.Module) -> list[nn.Module]:
    """The data-initialised layers of ``module`` not initialised yet."""
    return [m for m in module.modules()
            if hasattr(m, "initialize") and isinstance(getattr(m, "initialized", None), Tensor) and not bool(m.initialized)]


def reducible_init(module: nn.Module) -> bool:
    """Whether every data-initialised layer of ``module`` still waiting sets itself from moments (means and variances)
    that add up over ranks (``REDUCIBLE_INIT``): then each rank of a data-parallel job can initialise on its part
    of the batch, with the moments all-reduced (:func:`data_init` with ``reduce``)."""
    return all(getattr(m, "REDUCIBLE_INIT", False) for m in _waiting(module))


@contextmanager
def data_init(module: nn.Module, reduce: Reduce | None = None) -> Iterator[None]:
    """Inside the block, every data-initialised layer of ``module`` not initialised yet sets its
    parameters from the first input it sees (before computing on it), once.

    A data-initialised layer has ``initialize(x)`` and an ``initialized`` buffer (ActNorm, Flow++'s
    Norm and its convolutions, the Gaussian whitening). Training runs one forward pass on
    ``train.init_batch`` examples inside this block before its first step; ``forward`` itself never
    looks at ``initialized``, so a training step reads nothing back from the device.

    ``reduce`` (a data-parallel job, every layer :func:`reducible_init`): each rank passes its part of
    the batch, and the layers' moments are summed over the ranks, so every rank sets the parameters
    one process would set from the whole batch (:func:`moments`).
    """
    handles: dict[nn.Module, torch.utils.hooks.RemovableHandle] = {}
    waiting = _waiting(module)
    if reduce is not None and not all(getattr(m, "REDUCIBLE_INIT", False) for m in waiting):
        raise ValueError("a layer's data-dependent initialisation cannot be summed over ranks; initialise on the whole batch")

    def hook(layer: nn.Module, args: tuple) -> None:
        if reduce is None:
            layer.initialize(args[0])
        else:
            layer.initialize(args[0], reduce)
        handles.pop(layer).remove()

    for m in waiting:
        handles[m] = m.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        for h in handles.values():
            h.remove()


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum all dimensions but the first: ``(B, ...) -> (B,)``."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


class Sequential(Bijector):
    """Composition ``f_n ∘ … ∘ f_1``; log-determinants add."""

    def __init__(self, layers: Iterable[Bijector]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z


class Flatten(Bijector):
    """``(B, *shape) -> (B, prod(shape))``; volume preserving."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.shape)


def channels_last(x: Tensor) -> Tensor:
    """``(B, C, *rest) -> (B, *rest, C)`` with an explicit permutation (exports to ONNX cleanly)."""
    return x.permute(0, *range(2, x.dim()), 1)


def channels_first(x: Tensor) -> Tensor:
    """``(B, *rest, C) -> (B, C, *rest)``; inverse of :func:`channels_last`."""
    return x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Log-density of ``N(0, I)`` at ``z``: ``(B, ...) -> (B,)`` nats."""
    return sum_except_batch(-0.5 * z.pow(2) - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=z.dtype)))
