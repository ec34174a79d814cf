"""Butterfly layers against dense D×D matrices built from their parameters, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from models.flows import Butterfly, ButterflyFactor, data_init


def dense_factor(f: ButterflyFactor) -> torch.Tensor:
    """The D×D matrix of one factor, placed entry by entry from its 2×2 blocks (y = M x)."""
    a, b, c, d = (m.detach().double().expand(f.blocks, f.half) for m in f.matrices())
    m = torch.zeros(f.dim, f.dim, dtype=torch.float64)
    for blk in range(f.blocks):
        for j in range(f.half):
            i0 = blk * 2 * f.half + j
            i1 = i0 + f.half
            m[i0, i0], m[i0, i1], m[i1, i0], m[i1, i1] = a[blk, j], b[blk, j], c[blk, j], d[blk, j]
    return m


def dense(layer: Butterfly) -> torch.Tensor:
    out = torch.eye(layer.factors[0].dim, dtype=torch.float64)
    for f in layer.factors:  # level 0 is applied first
        out = dense_factor(f) @ out
    return out


def randomise(layer: Butterfly, seed: int = 0) -> Butterfly:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return layer.double()


@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("tied", [False, True])
def test_against_dense_matrix(d: int, tied: bool) -> None:
    layer = randomise(Butterfly((d,), levels=int(math.log2(d)), tied=tied, init="rotation"))
    m = dense(layer)
    x = torch.randn(5, d, dtype=torch.float64)
    z, logdet = layer(x)
    torch.testing.assert_close(z, x @ m.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(m).logabsdet.expand(5), rtol=1e-10, atol=1e-10)
    assert torch.linalg.det(m) > 0  # invertible by construction: every block has det e^{s1+s2}
    torch.testing.assert_close(layer.inverse(z), torch.linalg.solve(m, z.T).T, rtol=1e-9, atol=1e-9)


def test_full_butterfly_expresses_a_permutation() -> None:
    """With θ = π/2·k blocks act as swaps/sign flips; a full-level layer can realise bit reversal."""
    d = 8
    layer = Butterfly((d,), levels=3).double()
    with torch.no_grad():  # make every block a swap [[0, 1], [1, 0]]·diag(1, -1)... via θ = π/2, t = 0
        for f in layer.factors:
            f.theta.fill_(math.pi / 2)
    m = dense(layer).round()
    assert torch.equal(m.abs().sum(0), torch.ones(d, dtype=torch.float64))  # a signed permutation matrix
    assert torch.equal(m.abs().sum(1), torch.ones(d, dtype=torch.float64))


def test_gradient_reaches_every_parameter() -> None:
    layer = Butterfly((4, 4, 4), levels=6, init="rotation")
    z, logdet = layer(torch.randn(3, 4, 4, 4))
    (z.pow(2).sum() - logdet.sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_too_many_levels_names_the_largest_allowed() -> None:
    with pytest.raises(ValueError, match=r"D = 48 \(3 × 4 × 4\) with 1 partition\(s\) allows 1..4 butterfly levels, got 5"):
        Butterfly((3, 4, 4), levels=5)


def _params(config: str, spec) -> int:  # noqa: ANN001
    from models.architectures import build
    from models.training.loop import load_config

    return sum(p.numel() for p in build(load_config(config).model, spec).parameters())


def test_waveform_parameter_counts_match_the_released_configuration() -> None:
    from models.spec import DataSpec

    spec = DataSpec(kind="waveform", shape=(2, 1024), feature_names=["PLETH", "ABP"])
    assert _params("configs/butterflyflow_waveform.yaml", spec) == 15_280
    assert _params("configs/glow_waveform.yaml", spec) == 36_032


def test_cifar10_config_is_paper_size() -> None:
    from models.spec import DataSpec

    n = _params("configs/butterflyflow_cifar10.yaml", DataSpec(kind="image", shape=(3, 32, 32), levels=256))
    assert abs(n - 44.4e6) / 44.4e6 < 0.05, n


def test_waveform_flow_roundtrip_and_density() -> None:
    from models.architectures import build, parse_config
    from models.spec import DataSpec

    spec = DataSpec(kind="waveform", shape=(2, 64), feature_names=["PLETH", "ABP"])
    m = build(parse_config({"name": "waveform", "levels": 2, "steps": 2, "hidden": 8, "butterfly_levels": [6, 5]}), spec).double()
    x = torch.randn(4, 2, 64, dtype=torch.float64)
    m.train()
    with data_init(m):
        m.log_prob(x)
    m.eval()
    z, _ = m.flow(x)
    torch.testing.assert_close(m.flow.inverse(z), x, atol=1e-9, rtol=1e-9)
    assert torch.isfinite(m.log_prob(x)).all()
