"""What a model's data look like: the part of the contract the service validates against."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict


class DataSpec(BaseModel):
    """Shape and value domain of one data point.

    ``kind="image"``: integers in ``0..levels-1`` with ``shape = (C, H, W)``.
    ``kind="record"``: real vectors with ``shape = (D,)`` and ``feature_names`` of length D.
    ``kind="waveform"``: real multichannel windows with ``shape = (C, T)``; ``feature_names`` name the channels.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["image", "record", "waveform"]
    shape: tuple[int, ...]
    levels: int | None = None
    feature_names: list[str] | None = None
    units: list[str] | None = None
    ranges: list[tuple[float, float]] | None = None
    source: str = ""

    @property
    def dims(self) -> int:
        """Number of dimensions D of one data point."""
        return math.prod(self.shape)

    @property
    def discrete(self) -> bool:
        return self.levels is not None
