"""flowserve's density-model library: flows, architectures, data, training, artifacts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .density import DensityModel


def load(path: str, device: str = "cpu") -> "DensityModel":
    """Load an artifact directory as a ``DensityModel`` (checksums verified)."""
    from .artifacts.store import load as _load

    return _load(path, device)


__all__ = ["load"]
