"""Flow++ (Ho et al. 2019) as the official code builds it.

Main flow: logit preprocessing, then ``layout`` stages. ``"columns:N"`` splits even/odd columns
(the official "checkerboard"), ``"channel:N"`` splits channels, and each runs N steps of
Norm (per position) → Pointwise (per half) → logistic-mixture CDF coupling → swap halves;
``"squeeze"`` is a 2×2 space-to-depth. No multi-scale factor-out. The default layout is the
CIFAR-10 one: ``columns:4, squeeze, channel:2, columns:3`` (9 couplings).

Dequantization is variational by default (:class:`~models.dequantization.VariationalDequantizer`:
4 couplings with 2 blocks, a 32-channel context net of 3 gated convs) or uniform.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..density import DensityModel
from ..dequantization import VariationalDequantizer
from ..errors import ConfigError
from ..flows import (
    Bijector,
    ColumnMerge,
    ColumnSplit,
    Flatten,
    InverseOptions,
    Logit,
    MixtureCDFCoupling,
    Pointwise,
    PositionNorm,
    Sequential,
    Squeeze,
    SwapHalves,
)
from ..nets import ContextNet, FlowppConditioner
from ..spec import DataSpec

_STAGE = re.compile(r"^(squeeze|(columns|channel):([1-9][0-9]*))$")


class FlowppConfig(BaseModel):
    """Every size of Flow++; defaults are the paper's CIFAR-10 model (31,443,440 parameters on 3×32×32)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["flowpp"] = "flowpp"
    layout: list[str] = Field(default_factory=lambda: ["columns:4", "squeeze", "channel:2", "columns:3"])
    filters: int = Field(96, ge=1)
    blocks: int = Field(10, ge=0)
    components: int = Field(32, ge=0, description="mixture components K; 0 gives affine couplings (ablation)")
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.2, ge=0, lt=1)
    attention: bool = Field(True, description="False swaps attention for a gated pointwise MLP (ablation)")
    float64: bool = Field(False, description="evaluate the mixture CDF and pdf in float64 (default float32, as the official code trains)")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="logit preprocessing margin")
    dequantization: Literal["variational", "uniform"] = "variational"
    dequant_couplings: int = Field(4, ge=1)
    dequant_filters: int = Field(96, ge=1)
    dequant_blocks: int = Field(2, ge=0)
    context_channels: int = Field(32, ge=1)
    context_blocks: int = Field(3, ge=0)
    inverse: Literal["bisection", "newton"] = "bisection"
    inverse_bracket: float = Field(200.0, gt=0, description="bracket: component means ± this × Σ scales")
    inverse_tol: float = Field(1e-12, gt=0)
    inverse_max_iter: int = Field(200, ge=1)

    @field_validator("layout")
    @classmethod
    def _stages(cls, layout: list[str]) -> list[str]:
        for stage in layout:
            if not _STAGE.match(stage):
                raise ValueError(f"stage {stage!r}: expected 'squeeze', 'columns:N' or 'channel:N'")
        return layout

    def inverse_options(self) -> InverseOptions:
        return InverseOptions(self.inverse, self.inverse_bracket, self.inverse_tol, self.inverse_max_iter)


def _coupling_steps(cfg: FlowppConfig, pair: tuple[int, int, int], n: int, filters: int, blocks: int, context: int = 0) -> list[Bijector]:
    """``n`` × (Norm → Pointwise → coupling → swap) on a ``(2c, H, W)`` pair of halves."""
    c2, h, w = pair
    half = c2 // 2
    layers: list[Bijector] = []
    for _ in range(n):
        net = FlowppConditioner(half, half * (2 + 3 * cfg.components), (h, w), filters, blocks, cfg.heads, cfg.dropout, context, cfg.attention)
        layers += [PositionNorm(pair), Pointwise(c2, groups=2), MixtureCDFCoupling(net, cfg.components, cfg.float64, cfg.inverse_options()), SwapHalves()]
    return layers


def build_flowpp(cfg: FlowppConfig, spec: DataSpec) -> DensityModel:
    if spec.kind != "image" or len(spec.shape) != 3 or spec.levels is None:
        raise ConfigError(f"flowpp needs image data (C, H, W) with levels, got {spec.kind} {spec.shape}")
    c, h, w = spec.shape
    if w % 2:
        raise ConfigError(f"flowpp needs an even image width, got {w}")
    layers: list[Bijector] = [Logit(spec.levels, cfg.alpha)]
    shape = (c, h, w)
    for stage in cfg.layout:
        kind, _, n = stage.partition(":")
        c_, h_, w_ = shape
        if kind == "squeeze":
            if h_ % 2 or w_ % 2:
                raise ConfigError(f"flowpp layout {cfg.layout}: cannot squeeze {shape}")
            layers.append(Squeeze())
            shape = (4 * c_, h_ // 2, w_ // 2)
        elif kind == "columns":
            if w_ % 2:
                raise ConfigError(f"flowpp layout {cfg.layout}: cannot split the columns of {shape}")
            layers += [ColumnSplit(), *_coupling_steps(cfg, (2 * c_, h_, w_ // 2), int(n), cfg.filters, cfg.blocks), ColumnMerge()]
        else:
            if c_ % 2:
                raise ConfigError(f"flowpp layout {cfg.layout}: cannot split the {c_} channels of {shape} in two")
            layers += _coupling_steps(cfg, shape, int(n), cfg.filters, cfg.blocks)
    layers.append(Flatten(shape))
    dequantizer = None
    if cfg.dequantization == "variational":
        pair = (2 * c, h, w // 2)
        steps = _coupling_steps(cfg, pair, cfg.dequant_couplings, cfg.dequant_filters, cfg.dequant_blocks, cfg.context_channels)
        context = ContextNet(2 * c, cfg.context_channels, cfg.context_blocks, cfg.dropout)
        dequantizer = VariationalDequantizer(steps, context, spec.levels)
    return DensityModel(Sequential(layers), spec, dequantizer)
