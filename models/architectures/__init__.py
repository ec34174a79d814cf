"""Whole models built from a config: ``build(config, spec) -> DensityModel``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from ..density import DensityModel
from ..spec import DataSpec
from .butterflyflow import ButterflyFlowConfig, WaveformFlowConfig, build_butterflyflow, build_waveform
from .flowpp import FlowppConfig, build_flowpp
from .glow import GlowConfig, RealNVPConfig, build_glow, build_realnvp
from .tabular import TabularFlowConfig, build_tabular
from .vector import VectorFlowConfig, build_vector

ArchitectureConfig = Annotated[
    GlowConfig | RealNVPConfig | VectorFlowConfig | TabularFlowConfig | ButterflyFlowConfig | WaveformFlowConfig | FlowppConfig, Field(discriminator="name")
]
_ADAPTER: TypeAdapter = TypeAdapter(ArchitectureConfig)

_BUILDERS = {
    "glow": build_glow,
    "realnvp": build_realnvp,
    "vector": build_vector,
    "tabular": build_tabular,
    "butterflyflow": build_butterflyflow,
    "waveform": build_waveform,
    "flowpp": build_flowpp,
}


def parse_config(data: dict[str, Any]) -> Any:
    """Validate an architecture config dict (``name`` selects the architecture)."""
    return _ADAPTER.validate_python(data)


def sized_for(cfg: Any, records: int, features: int) -> Any:
    """``cfg`` with the sizes it leaves to the data set for ``records`` training records of ``features`` values
    (architectures without such sizes: ``cfg`` itself)."""
    return cfg.sized_for(records, features) if hasattr(cfg, "sized_for") else cfg


def build(cfg: Any, spec: DataSpec) -> DensityModel:
    """Build an untrained ``DensityModel`` for data described by ``spec``."""
    built = _BUILDERS[cfg.name](cfg, spec)
    return built if isinstance(built, DensityModel) else DensityModel(built, spec)


__all__ = ["ArchitectureConfig", "TabularFlowConfig", "build", "parse_config", "sized_for"]
