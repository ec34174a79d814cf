"""Glow (Kingma & Dhariwal 2018) and RealNVP (Dinh et al. 2017) for images.

Both are multi-scale: each level squeezes 2×2, runs its steps, and (but the last) factors out
half the channels through a learned conditional Gaussian. The latent is flat ``(B, C·H·W)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..flows import (
    ActNorm,
    AffineCoupling,
    Bijector,
    Flatten,
    InvConv1x1,
    InvConv1x1LU,
    Logit,
    MultiScale,
    Sequential,
    Squeeze,
)
from ..spec import DataSpec


class GlowConfig(BaseModel):
    """Glow: per level, ``steps`` × (ActNorm → invertible 1×1 conv → affine coupling)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["glow"] = "glow"
    levels: int = Field(2, ge=1)
    steps: int = Field(8, ge=1)
    hidden: int = Field(64, ge=1)
    lu: bool = True
    alpha: float = Field(0.05, gt=0, lt=0.5, description="logit preprocessing margin")


class RealNVPConfig(BaseModel):
    """RealNVP: per level, 3 checkerboard couplings, squeeze, 3 channel couplings (last level: 4 checkerboard)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["realnvp"] = "realnvp"
    levels: int = Field(2, ge=1)
    hidden: int = Field(64, ge=1)
    alpha: float = Field(0.05, gt=0, lt=0.5)


def _check_image(spec: DataSpec, levels: int, arch: str) -> tuple[int, int, int]:
    if spec.kind != "image" or len(spec.shape) != 3 or spec.levels is None:
        raise ConfigError(f"{arch} needs image data (C, H, W) with levels, got {spec.kind} {spec.shape}")
    c, h, w = spec.shape
    if h % (2**levels) or w % (2**levels):
        raise ConfigError(f"{arch} with {levels} levels needs H and W divisible by {2**levels}, got {h}×{w}")
    return c, h, w


def _multiscale(shape: tuple[int, int, int], levels: int, level_steps) -> Bijector:  # noqa: ANN001
    """Recursive multi-scale stack; ``level_steps(shape, last) -> (layers, out_shape)``."""
    layers, out = level_steps(shape, levels == 1)
    head = Sequential(layers)
    if levels == 1:
        return Sequential([head, Flatten(out)])
    kept = (out[0] // 2, out[1], out[2])
    return MultiScale(head, out, _multiscale(kept, levels - 1, level_steps))


def build_glow(cfg: GlowConfig, spec: DataSpec) -> Bijector:
    _check_image(spec, cfg.levels, "glow")
    conv = InvConv1x1LU if cfg.lu else InvConv1x1

    def level(shape: tuple[int, int, int], last: bool) -> tuple[list[Bijector], tuple[int, int, int]]:
        c, h, w = shape
        s = (4 * c, h // 2, w // 2)
        layers: list[Bijector] = [Squeeze()]
        for _ in range(cfg.steps):
            layers += [ActNorm(s[0]), conv(s[0]), AffineCoupling(s, cfg.hidden, "channel")]
        return layers, s

    return Sequential([Logit(spec.levels, cfg.alpha), _multiscale(spec.shape, cfg.levels, level)])


def build_realnvp(cfg: RealNVPConfig, spec: DataSpec) -> Bijector:
    _check_image(spec, cfg.levels, "realnvp")

    def level(shape: tuple[int, int, int], last: bool) -> tuple[list[Bijector], tuple[int, int, int]]:
        c, h, w = shape
        n_checker = 4 if last else 3
        layers: list[Bijector] = []
        for i in range(n_checker):
            layers += [ActNorm(c), AffineCoupling(shape, cfg.hidden, "checkerboard", parity=i % 2)]
        if last:
            return layers, shape
        s = (4 * c, h // 2, w // 2)
        layers.append(Squeeze())
        for i in range(3):
            layers += [ActNorm(s[0]), AffineCoupling(s, cfg.hidden, "channel", parity=i % 2)]
        return layers, s

    # RealNVP's last level keeps full resolution; one level fewer squeezes than Glow's.
    return Sequential([Logit(spec.levels, cfg.alpha), _multiscale(spec.shape, cfg.levels, level)])
