"""ButterflyFlow (Meng et al. 2022) for images and for multichannel waveforms.

Images: Glow's multi-scale structure; each step is ActNorm → (optional invertible 1×1 conv) →
butterfly over the whole C×H×W of the step → affine coupling. ``butterfly_levels`` per scale
(``"full"``: the largest K the scale's D allows, i.e. log2 of D's power of two).

Waveforms ``(C, T)`` (the paper's MIMIC-III model): per level, squeeze time into channels, then
``steps`` × (ActNorm → LU 1×1 conv → tied butterfly over the flattened window (time-major,
channels fastest) → RealNVP MLP coupling pointwise in time), then factor out half the channels
against a standard normal. Without ``butterfly_levels`` it is the paper's Glow baseline.
``whiten: true`` puts a data-initialised full-covariance whitening in front
(:class:`~models.flows.GaussianWhitening`), so the flow starts as the Gaussian and learns the rest.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..flows import (
    ActNorm,
    AffineCoupling,
    Bijector,
    Butterfly,
    Flatten,
    GaussianWhitening,
    InvConv1x1,
    InvConv1x1LU,
    Logit,
    MultiScale,
    RealNVPCoupling,
    Sequential,
    Squeeze,
    Squeeze1d,
    max_levels,
)
from ..spec import DataSpec
from .glow import _check_image, _multiscale


class ButterflyFlowConfig(BaseModel):
    """ButterflyFlow for images."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["butterflyflow"] = "butterflyflow"
    levels: int = Field(2, ge=1)
    steps: int = Field(8, ge=1)
    hidden: int = Field(64, ge=1)
    butterfly_levels: int | list[int] | Literal["full"] = Field("full", description="per scale; an int applies to every scale")
    tied: bool = False
    init: Literal["identity", "rotation"] = "identity"
    layout: Literal["channel_major", "channel_last"] = "channel_major"
    partitions: int = Field(1, ge=1)
    conv1x1: bool = True
    lu: bool = True
    alpha: float = Field(0.05, gt=0, lt=0.5)


class WaveformFlowConfig(BaseModel):
    """Flows for multichannel waveform windows ``(C, T)``: ButterflyFlow, or Glow without ``butterfly_levels``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["waveform"] = "waveform"
    levels: int = Field(2, ge=1)
    steps: int = Field(2, ge=1)
    hidden: int = Field(16, ge=1)
    butterfly_levels: list[int] = Field(default_factory=list, description="per level; empty = Glow baseline")
    init: Literal["identity", "rotation"] = "rotation"
    whiten: bool = Field(False, description="start with GaussianWhitening: the flow starts as a full-covariance Gaussian")


def _levels_for(cfg: ButterflyFlowConfig, scale: int, d: int) -> int:
    spec = cfg.butterfly_levels
    if spec == "full":
        return max_levels(d) - int(math.log2(cfg.partitions))
    k = spec if isinstance(spec, int) else (spec[scale] if scale < len(spec) else 0)
    return k


def build_butterflyflow(cfg: ButterflyFlowConfig, spec: DataSpec) -> Bijector:
    _check_image(spec, cfg.levels, "butterflyflow")
    conv = InvConv1x1LU if cfg.lu else InvConv1x1
    scale = {"i": 0}

    def level(shape: tuple[int, int, int], last: bool) -> tuple[list[Bijector], tuple[int, int, int]]:
        c, h, w = shape
        s = (4 * c, h // 2, w // 2)
        k = _levels_for(cfg, scale["i"], math.prod(s))
        scale["i"] += 1
        layers: list[Bijector] = [Squeeze()]
        for _ in range(cfg.steps):
            layers.append(ActNorm(s[0]))
            if cfg.conv1x1:
                layers.append(conv(s[0]))
            if k > 0:
                try:
                    layers.append(Butterfly(s, k, cfg.tied, cfg.init, cfg.layout, cfg.partitions))
                except ValueError as e:
                    raise ConfigError(f"butterflyflow scale {scale['i']}: {e}") from None
            layers.append(AffineCoupling(s, cfg.hidden, "channel"))
        return layers, s

    return Sequential([Logit(spec.levels, cfg.alpha), _multiscale(spec.shape, cfg.levels, level)])


def build_waveform(cfg: WaveformFlowConfig, spec: DataSpec) -> Bijector:
    if spec.kind != "waveform" or len(spec.shape) != 2:
        raise ConfigError(f"the waveform flow needs waveform windows (C, T), got {spec.kind} {spec.shape}")
    c, t = spec.shape
    if t % (2**cfg.levels):
        raise ConfigError(f"{cfg.levels} levels need T divisible by {2**cfg.levels}, got T = {t}")
    if cfg.butterfly_levels and len(cfg.butterfly_levels) != cfg.levels:
        raise ConfigError(f"butterfly_levels needs one entry per level ({cfg.levels}), got {cfg.butterfly_levels}")

    def build(shape: tuple[int, int], lvl: int) -> Bijector:
        s = (2 * shape[0], shape[1] // 2)
        layers: list[Bijector] = [Squeeze1d()]
        for _ in range(cfg.steps):
            layers += [ActNorm(s[0]), InvConv1x1LU(s[0])]
            if cfg.butterfly_levels:
                try:
                    layers.append(Butterfly(s, cfg.butterfly_levels[lvl], tied=True, init=cfg.init, layout="channel_last"))
                except ValueError as e:
                    raise ConfigError(f"waveform level {lvl}: {e}") from None
            layers.append(RealNVPCoupling(s[0], cfg.hidden))
        head = Sequential(layers)
        if lvl == cfg.levels - 1:
            return Sequential([head, Flatten(s)])
        return MultiScale(head, s, build((s[0] // 2, s[1]), lvl + 1), learned_prior=False)

    flow = build((c, t), 0)
    return Sequential([GaussianWhitening((c, t)), flow]) if cfg.whiten else flow
