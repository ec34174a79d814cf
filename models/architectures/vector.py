"""A flow for real-valued vectors (tabular records): ActNorm → learned linear mixing → MLP coupling."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..flows import ActNorm, AffineCoupling, Bijector, InvConv1x1LU, Sequential
from ..spec import DataSpec


class VectorFlowConfig(BaseModel):
    """``steps`` × (ActNorm → LU linear map → affine coupling with an MLP of ``depth`` hidden layers)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["vector"] = "vector"
    steps: int = Field(8, ge=1)
    hidden: int = Field(64, ge=1)
    depth: int = Field(2, ge=1)


def build_vector(cfg: VectorFlowConfig, spec: DataSpec) -> Bijector:
    if len(spec.shape) != 1 or spec.shape[0] < 2:
        raise ConfigError(f"the vector flow needs records of shape (D,) with D ≥ 2, got {spec.shape}")
    d = spec.shape[0]
    layers: list[Bijector] = []
    for i in range(cfg.steps):
        layers += [ActNorm(d), InvConv1x1LU(d), AffineCoupling((d,), cfg.hidden, "channel", parity=i % 2, depth=cfg.depth)]
    layers.append(ActNorm(d))
    return Sequential(layers)
