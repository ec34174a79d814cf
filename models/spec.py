"""What a model's data look like: the part of the contract the service validates against."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict


class DataSpec(BaseModel):
    """Shape and value domain of one data point.

    ``kind="image"``: integers in ``0..levels-1`` with ``shape = (C, H, W)``.
    ``kind="record"``: real vectors with ``shape = (D,)`` and ``feature_names`` of length D;
    ``discrete_features`` lists integer-valued features (e.g. Glasgow coma scale), dequantized with U(0, 1) noise;
    ``feature_groups`` names coupled features attributed together (blood pressure: systolic, diastolic, mean);
    ``derived`` maps a feature to the features it is the sum of (the Glasgow total), which samples respect.
    ``kind="waveform"``: real multichannel windows with ``shape = (C, T)``; ``feature_names`` name the channels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image", "record", "waveform"]
    shape: tuple[int, ...]
    levels: int | None = None
    feature_names: list[str] | None = None
    units: list[str] | None = None
    ranges: list[tuple[float, float]] | None = None
    discrete_features: list[int] | None = None
    feature_groups: dict[str, list[str]] | None = None
    derived: dict[str, list[str]] | None = None
    source: str = ""

    @property
    def dims(self) -> int:
        """Number of dimensions D of one data point."""
        return math.prod(self.shape)

    @property
    def discrete(self) -> bool:
        """Integer levels throughout (images)."""
        return self.levels is not None

    @property
    def dequantized(self) -> bool:
        """Whether scoring takes dequantization noise: discrete data, or records with integer-valued features."""
        return self.discrete or bool(self.discrete_features)

    def random_examples(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` random float32 examples inside the data domain ``(n, *shape)`` (for warm-up and parity checks).

        Images: uniform integer levels. Records: uniform within each feature's range. Waveforms:
        uniform within each channel's range. Without ranges: standard normal.
        """
        rng = np.random.default_rng(seed)
        if self.discrete:
            return rng.integers(0, self.levels, (n, *self.shape)).astype(np.float32)
        if self.ranges:
            lo, hi = np.array(self.ranges, dtype=np.float32).T
            per_first_axis = (len(lo),) + (1,) * (len(self.shape) - 1)
            lo, hi = lo.reshape(per_first_axis), hi.reshape(per_first_axis)
            return (lo + (hi - lo) * rng.random((n, *self.shape))).astype(np.float32)
        return rng.standard_normal((n, *self.shape)).astype(np.float32)
