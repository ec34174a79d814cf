"""MLP conditioners for couplings on vectors (records, waveform windows)."""

from __future__ import annotations

from torch import Tensor, nn


class MLP(nn.Module):
    """``Linear → (act → Linear)×depth``; the last layer starts at zero so couplings start near identity.

    Shapes: ``(B, in_features) -> (B, out_features)``.
    """

    def __init__(self, in_features: int, out_features: int, hidden: int, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        last = nn.Linear(width, out_features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
