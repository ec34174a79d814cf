"""The one shared test every invertible layer joins by being listed in ``LAYERS``.

For each layer, on small float64 inputs: ``inverse(forward(x)) ≈ x``; the forward log-det
equals ``log|det J|`` from autograd; the inverse's log-det is its negative.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from models import flows as F
from models.flows import linear
from models.nets import FlowppConditioner

Factory = Callable[[], tuple[nn.Module, tuple[int, ...]]]


def _with_random_params(layer: nn.Module) -> nn.Module:
    """Move zero-initialised weights away from zero so the test sees a non-trivial map."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _vector_multiscale() -> tuple[nn.Module, tuple[int, ...]]:
    inner = F.Sequential([F.AffineCoupling((2, 2, 2), hidden=8), F.Flatten((2, 2, 2))])
    head = F.Sequential([F.Squeeze(), F.ActNorm(4)])
    return F.MultiScale(head, (4, 2, 2), inner), (1, 4, 4)


def _mixture_coupling(components: int, method: str = "bisection", attention: bool = True) -> nn.Module:
    net = FlowppConditioner(2, 2 * (2 + 3 * components), (2, 2), filters=8, blocks=1, heads=2, attention=attention)
    return F.MixtureCDFCoupling(net, components, inverse=F.InverseOptions(method=method))


LAYERS: dict[str, Factory] = {
    "actnorm_image": lambda: (F.ActNorm(3), (3, 2, 2)),
    "actnorm_vector": lambda: (F.ActNorm(5), (5,)),
    "invconv": lambda: (F.InvConv1x1(3), (3, 2, 2)),
    "invconv_lu": lambda: (F.InvConv1x1LU(4), (4, 2, 2)),
    "invlinear_lu": lambda: (F.InvConv1x1LU(6), (6,)),
    "coupling_channel": lambda: (F.AffineCoupling((4, 2, 2), hidden=8), (4, 2, 2)),
    "coupling_channel_odd": lambda: (F.AffineCoupling((3, 2, 2), hidden=8, parity=1), (3, 2, 2)),
    "coupling_checkerboard": lambda: (F.AffineCoupling((2, 4, 4), hidden=8, mask="checkerboard", parity=1), (2, 4, 4)),
    "coupling_vector": lambda: (F.AffineCoupling((5,), hidden=8), (5,)),
    "squeeze": lambda: (F.Squeeze(), (1, 4, 4)),
    "logit": lambda: (F.Logit(levels=17), (1, 2, 2)),
    "gaussian_split": lambda: (F.GaussianSplit(4), (4, 2, 2)),
    "multiscale": _vector_multiscale,
    "invconv_lu_sequence": lambda: (F.InvConv1x1LU(4), (4, 3)),
    "squeeze1d": lambda: (F.Squeeze1d(), (2, 8)),
    "realnvp_coupling_sequence": lambda: (F.RealNVPCoupling(4, hidden=8), (4, 3)),
    "butterfly_untied": lambda: (F.Butterfly((16,), levels=4, init="rotation"), (16,)),
    "butterfly_tied": lambda: (F.Butterfly((2, 8), levels=4, tied=True, init="rotation"), (2, 8)),
    "butterfly_image_channel_last": lambda: (F.Butterfly((4, 2, 2), levels=3, layout="channel_last", init="rotation"), (4, 2, 2)),
    "butterfly_partitioned": lambda: (F.Butterfly((2, 4, 4), levels=2, partitions=4, init="rotation"), (2, 4, 4)),
    "position_norm": lambda: (F.PositionNorm((2, 2, 2)), (2, 2, 2)),
    "gaussian_whitening": lambda: (F.GaussianWhitening((2, 3)), (2, 3)),
    "gaussian_whitening_cv": lambda: (F.GaussianWhitening((6,), shrinkage="cv"), (6,)),
    "yeo_johnson": lambda: (F.YeoJohnson(5), (5,)),
    "permutation": lambda: (F.Permutation(5, seed=3), (5,)),
    "coupling_vector_soft_clamp": lambda: (F.AffineCoupling((5,), hidden=8, soft_clamp=2.0), (5,)),
    "pointwise_grouped": lambda: (F.Pointwise(4, groups=2), (4, 2, 2)),
    "column_split": lambda: (F.ColumnSplit(), (2, 2, 4)),
    "column_merge": lambda: (F.ColumnMerge(), (4, 2, 2)),
    "swap_halves": lambda: (F.SwapHalves(), (4, 2, 2)),
    "sigmoid": lambda: (F.Sigmoid(), (1, 2, 2)),
    "mixture_coupling": lambda: (_mixture_coupling(components=3), (4, 2, 2)),
    "mixture_coupling_newton": lambda: (_mixture_coupling(components=3, method="newton"), (4, 2, 2)),
    "mixture_coupling_affine": lambda: (_mixture_coupling(components=0), (4, 2, 2)),
    "mixture_coupling_no_attention": lambda: (_mixture_coupling(components=2, attention=False), (4, 2, 2)),
}

# Layers whose domain is bounded get inputs drawn from inside it.
DOMAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "logit": lambda x: torch.sigmoid(x) * 17.0,
}


def _inputs(name: str, shape: tuple[int, ...], batch: int = 3) -> torch.Tensor:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return DOMAIN.get(name, lambda t: t)(x)


def _layer(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    layer, shape = LAYERS[name]()
    layer = _with_random_params(layer).double()
    layer.train()
    with F.data_init(layer):  # where a layer has one
        layer(_inputs(name, shape, batch=8))
    return layer.eval(), shape


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_roundtrip(name: str) -> None:
    layer, shape = _layer(name)
    x = _inputs(name, shape)
    z, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(layer.inverse(z), x, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_logdet_matches_autograd_jacobian(name: str) -> None:
    layer, shape = _layer(name)
    x = _inputs(name, shape)
    _, logdet = layer(x)
    for i in range(x.shape[0]):
        def f(xi: torch.Tensor) -> torch.Tensor:
            return layer(xi.unsqueeze(0))[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i])
        jac = jac.reshape(jac.shape[0], -1)
        expected = torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(logdet[i], expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_inverse_logdet_is_negative_forward(name: str) -> None:
    layer, shape = _layer(name)
    x = _inputs(name, shape)
    z, logdet = layer(x)
    jac = torch.autograd.functional.jacobian(lambda zi: layer.inverse(zi.unsqueeze(0)).reshape(-1), z[0])
    inv_logdet = torch.linalg.slogdet(jac.reshape(jac.shape[0], -1)).logabsdet
    torch.testing.assert_close(inv_logdet, -logdet[0], atol=1e-6, rtol=1e-6)


def test_gaussian_whitening_is_the_ledoit_wolf_gaussian() -> None:
    """Whitening + a standard normal base is exactly the Ledoit-Wolf Gaussian of the init batch."""
    import numpy as np
    from scipy.stats import multivariate_normal
    from sklearn.covariance import LedoitWolf

    rng = np.random.default_rng(0)
    mix = rng.standard_normal((12, 12))
    x = rng.standard_normal((40, 12)) @ mix + 3.0  # correlated, N > D
    layer = F.GaussianWhitening((3, 4)).double().train()
    xt = torch.from_numpy(x).reshape(40, 3, 4)
    with F.data_init(layer):
        layer(xt)
    layer.eval()
    z, logdet = layer(xt)
    ours = (F.standard_normal_log_prob(z) + logdet).numpy()
    lw = LedoitWolf().fit(x)
    expected = multivariate_normal(lw.location_, lw.covariance_).logpdf(x)
    np.testing.assert_allclose(ours, expected, rtol=1e-9, atol=1e-9)
    assert torch.equal(layer.weight, torch.tril(layer.weight))  # innovations: z_i depends on x_1..x_i only
    assert list(layer.parameters()) == []  # fixed after the initialisation: buffers only


def test_data_init_is_an_explicit_pass() -> None:
    """A layer's forward never initialises it (no device read per call); :func:`data_init` does, once."""
    layer = F.ActNorm(3).train()
    x = torch.randn(64, 3) * 4 + 2
    layer(x)
    assert not bool(layer.initialized) and torch.equal(layer.loc, torch.zeros(3))
    with F.data_init(layer):
        z, _ = layer(x)
        layer(x * 10)  # only the first batch initialises
    assert bool(layer.initialized)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert not layer._forward_pre_hooks  # nothing left behind


@pytest.mark.parametrize("shape", [(4, 4, 4), (8, 2, 2), (3, 16), (12, 3, 3)])
def test_channel_mixing_is_the_1x1_convolution(shape: tuple[int, ...]) -> None:
    """On the CPU up to ``SUM_MAX_CHANNELS`` channels mix by multiply-sum, more by convolution: both
    are ``z = W x`` at every position; the multiply-sum's rows are bit-for-bit independent of their
    batch-mates (eager CPU convolutions are not: their algorithm depends on the batch size)."""
    layer = _with_random_params(F.InvConv1x1LU(shape[0])).eval()
    x = torch.randn(67, *shape)
    w = layer.weight_matrix().detach()
    conv = torch.nn.functional.conv1d if len(shape) == 2 else torch.nn.functional.conv2d
    with torch.no_grad():
        z, _ = layer(x)
        torch.testing.assert_close(z, conv(x, w.view(*w.shape, *(1,) * (len(shape) - 1))), rtol=1e-5, atol=1e-5)
        if shape[0] <= linear.SUM_MAX_CHANNELS:
            assert torch.equal(torch.cat([layer(x[i : i + 1])[0] for i in range(len(x))]), z)


def test_channel_mixing_exports_as_onnx_conv() -> None:
    """ONNX export keeps the 1×1 ``Conv`` node at any channel count (the multiply-sum is for torch on the CPU only)."""
    onnx = pytest.importorskip("onnx")
    layer = _with_random_params(F.InvConv1x1LU(4)).eval()
    layer.freeze()  # plain matrices, as models.artifacts.export exports them
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # as models.artifacts.export: the channel count is a constant
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy TorchScript exporter, as models.artifacts.export uses
        torch.onnx.export(_FirstOutput(layer), (torch.randn(2, 4, 3, 3),), buf, dynamo=False)
    ops = {n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node}
    assert "Conv" in ops and not ops & {"Mul", "Add", "ReduceSum"}, ops


class _FirstOutput(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


@pytest.mark.parametrize("lam", [-2.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0])
def test_yeo_johnson_map_is_scipys_and_inverts(lam: float) -> None:
    """``ψ_λ`` equals scipy's Yeo-Johnson on both sides of zero (the log branches at λ = 0 and 2 too), the
    inverse undoes it, and ``log ψ'`` is the log of autograd's derivative."""
    import numpy as np
    from scipy import stats

    from models.flows.marginal import yeo_johnson, yeo_johnson_inverse

    u = torch.linspace(-6, 6, 49, dtype=torch.float64, requires_grad=True)
    y, log_d = yeo_johnson(u, torch.tensor(lam, dtype=torch.float64))
    np.testing.assert_allclose(y.detach().numpy(), stats.yeojohnson(u.detach().numpy(), lmbda=lam), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(yeo_johnson_inverse(y.detach(), torch.tensor(lam, dtype=torch.float64)), u.detach())
    (grad,) = torch.autograd.grad(y.sum(), u)
    torch.testing.assert_close(log_d.detach(), grad.log())


def test_yeo_johnson_layer_standardises_skewed_columns_and_spikes_constant_ones() -> None:
    """After initialisation each column has mean 0 and sd 1, a log-normal column is near-Gaussian, and a
    constant column keeps its value at 0 with a spike so narrow that any other value is far out."""
    import numpy as np
    from scipy import stats

    rng = np.random.default_rng(0)
    x = np.c_[np.exp(rng.standard_normal(2000)) * 1000, rng.standard_normal(2000) * 0.01 + 5, np.full(2000, 7.0)]
    layer = F.YeoJohnson(3).double()
    xt = torch.from_numpy(x)
    with F.data_init(layer):
        z, logdet = layer(xt)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(z[:, :2].mean(0), torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(z[:, :2].std(0, unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-9, rtol=0)
    assert abs(stats.skew(x[:, 0])) > 3 and abs(stats.skew(z[:, 0].numpy())) < 0.25  # skew 3.6 → 0.20
    assert torch.equal(z[:, 2], torch.zeros(2000, dtype=torch.float64))
    off = xt[:1].clone()
    off[0, 2] = 7.1
    assert layer(off)[0][0, 2] > 10  # 0.1 away from the constant: ≥ 10 standard units out
