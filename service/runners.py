"""Backends behind one interface: a model on one device that scores and samples numpy batches.

``log_prob(x, noise) -> (B,)`` nats; ``sample(z) -> (B, *shape)`` in data space.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models.artifact import Manifest, load
from models.density import DensityModel


class Runner(Protocol):
    backend: str
    device: str
    manifest: Manifest

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray: ...

    def sample(self, z: np.ndarray) -> np.ndarray: ...


class TorchRunner:
    """A ``DensityModel`` on a torch device, in inference mode."""

    backend = "torch"

    def __init__(self, path: Path, device: str) -> None:
        self.device = device
        self.model: DensityModel = load(path, device)
        self.manifest = self.model.manifest

    def log_prob(self, x: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        with torch.inference_mode():
            xt = torch.from_numpy(x).to(self.device, torch.float32)
            nt = None if noise is None else torch.from_numpy(noise).to(self.device)
            return self.model.log_prob(xt, nt).double().cpu().numpy()

    def sample(self, z: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.model.sample(len(z), 1.0, z=torch.from_numpy(z)).cpu().numpy()


def open_runner(path: Path, device: str, backend: str) -> Runner:
    """Open the artifact at ``path`` with the chosen backend (``auto`` → torch)."""
    return TorchRunner(path, device)
