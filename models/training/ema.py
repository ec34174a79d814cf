"""Exponential moving average of a model's weights, for evaluation and export (Polyak averaging)."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


class EMA(nn.Module):
    """``θ̄ ← θ̄ + (1 − decay)(θ − θ̄)`` after every step, for parameters and floating-point buffers
    (other buffers are copied); the first update copies the model.

    Unlike ``torch.optim.swa_utils.AveragedModel``, an update reads nothing back from the device
    (no ``if n_averaged == 0`` on a device tensor), so a training step on a GPU never waits for
    it. The state dict has ``AveragedModel``'s layout (``module.*``, ``n_averaged``): checkpoints
    written with either load into either.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        device = next(model.parameters()).device
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long, device=device))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = torch.where(self.n_averaged == 0, 1.0, 1.0 - self.decay)
        groups: dict[torch.dtype, tuple[list, list]] = {}
        for a, b in zip(itertools.chain(self.module.parameters(), self.module.buffers()),
                        itertools.chain(model.parameters(), model.buffers())):
            if a.is_floating_point():
                averaged, current = groups.setdefault(a.dtype, ([], []))
                averaged.append(a)
                current.append(b.detach())
            else:
                a.copy_(b)
        for dtype, (averaged, current) in groups.items():
            torch._foreach_lerp_(averaged, current, weight.to(dtype))
        self.n_averaged.add_(1)
