"""Flow++: mixture-CDF math and inverse, couplings with context, variational dequantization,
the paper's parameter counts, and sampling a trained artifact at several temperatures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from models.architectures import build, parse_config
from models.artifacts import store as artifact
from models.cli import app
from models.data import load_dataset
from models.flows import (
    InverseOptions,
    MixtureCDFCoupling,
    data_init,
    mixture_inverse_cdf,
    mixture_log_cdf,
    mixture_log_pdf,
    mixture_logit_cdf,
)
from models.nets import FlowppConditioner
from models.spec import DataSpec

TINY_FLOWPP = {
    "name": "flowpp", "filters": 8, "blocks": 1, "components": 3, "heads": 2, "dropout": 0.0,
    "dequant_couplings": 2, "dequant_filters": 8, "dequant_blocks": 1, "context_channels": 4, "context_blocks": 1,
}


def _reference_mixture(n: int) -> tuple[torch.Tensor, ...]:
    """The official unit test's mixture: logits (.1, .2, 4), means (−1, 0, 1), log-scales (−5, 0, .2)."""
    params = [torch.tensor(v, dtype=torch.float64).expand(n, 3) for v in ([0.1, 0.2, 4.0], [-1.0, 0.0, 1.0], [-5.0, 0.0, 0.2])]
    return tuple(params)


@pytest.mark.parametrize("method", ["bisection", "newton"])
def test_inverse_reaches_1e5_on_the_reference_mixture(method: str) -> None:
    x = torch.linspace(-30.0, 30.0, 20001, dtype=torch.float64)
    mix = _reference_mixture(len(x))
    target = mixture_logit_cdf(x, *mix)
    inv, iterations = mixture_inverse_cdf(target, *mix, InverseOptions(method=method))
    assert inv.dtype == torch.float64
    assert float((inv - x).abs().max()) < 1e-5
    assert iterations < 200


@pytest.mark.parametrize("method", ["bisection", "newton"])
def test_float32_inverse_reaches_float32_accuracy(method: str) -> None:
    """The default precision: CDF and inverse in float32, stopping when the bracket stops shrinking."""
    x = torch.linspace(-30.0, 30.0, 20001, dtype=torch.float32)
    mix = tuple(p.float() for p in _reference_mixture(len(x)))
    target = mixture_logit_cdf(x, *mix)
    inv, iterations = mixture_inverse_cdf(target, *mix, InverseOptions(method=method))
    assert inv.dtype == torch.float32 and iterations < 200
    # where the logit CDF is steep enough for float32 to resolve x (|σ⁻¹F| < 15), 1e-4 absolute
    resolvable = target.abs() < 15
    assert float((inv - x)[resolvable].abs().max()) < 1e-4
    assert torch.isfinite(inv).all()


def test_inverse_stops_at_the_iteration_cap() -> None:
    x = torch.linspace(-3.0, 3.0, 11, dtype=torch.float64)
    mix = _reference_mixture(len(x))
    _, iterations = mixture_inverse_cdf(mixture_logit_cdf(x, *mix), *mix, InverseOptions(max_iter=5))
    assert iterations == 5


def test_log_cdf_is_finite_and_accurate_far_in_the_tails() -> None:
    x = torch.tensor([-1e4, -50.0, -3.0, 0.3, 3.0, 50.0, 1e4], dtype=torch.float64)
    mix = _reference_mixture(len(x))
    log_f, log_1mf = mixture_log_cdf(x, *mix)
    assert torch.isfinite(log_f).all() and torch.isfinite(log_1mf).all() and torch.isfinite(mixture_log_pdf(x, *mix)).all()
    w = torch.softmax(mix[0], -1)
    cdf = (w * torch.sigmoid((x.unsqueeze(-1) - mix[1]) * torch.exp(-mix[2]))).sum(-1)
    moderate = slice(2, 5)
    torch.testing.assert_close(log_f[moderate].exp(), cdf[moderate])
    torch.testing.assert_close(log_f.exp() + log_1mf.exp(), torch.ones_like(x))
    # far right: 1 − F underflows in probability space but its log stays exact
    assert float(log_1mf[-1]) < -1000 and float(log_f[0]) < -1000


def test_pdf_is_the_derivative_of_the_cdf() -> None:
    x = torch.linspace(-4.0, 4.0, 81, dtype=torch.float64)
    mix = _reference_mixture(len(x))
    h = 1e-6
    fd = (mixture_log_cdf(x + h, *mix)[0].exp() - mixture_log_cdf(x - h, *mix)[0].exp()) / (2 * h)
    torch.testing.assert_close(mixture_log_pdf(x, *mix).exp(), fd, rtol=1e-5, atol=1e-8)


def _coupling(components: int = 4, context: int = 0) -> MixtureCDFCoupling:
    torch.manual_seed(0)
    net = FlowppConditioner(2, 2 * (2 + 3 * components), (3, 2), filters=8, blocks=1, heads=2, context_channels=context)
    layer = MixtureCDFCoupling(net, components).double()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer.eval()


def test_per_element_logdet_matches_finite_differences() -> None:
    layer = _coupling()
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    scale, _, logits, means, log_scales = layer._params(x[:, :2], None)
    xb = x[:, 2:]
    log_f, log_1mf = mixture_log_cdf(xb, logits, means, log_scales)
    per_element = mixture_log_pdf(xb, logits, means, log_scales) - log_f - log_1mf + scale
    eps = 1e-6
    fd = torch.empty_like(xb)
    for idx in np.ndindex(*xb.shape):
        up, down = x.clone(), x.clone()
        up[(idx[0], idx[1] + 2, *idx[2:])] += eps
        down[(idx[0], idx[1] + 2, *idx[2:])] -= eps
        fd[idx] = (layer(up)[0] - layer(down)[0])[(idx[0], idx[1] + 2, *idx[2:])] / (2 * eps)
    torch.testing.assert_close(per_element, fd.log(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer(x)[1], per_element.flatten(1).sum(1))


def test_coupling_with_context_roundtrips_and_depends_on_it() -> None:
    layer = _coupling(context=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64, generator=g)
    ctx = torch.randn(2, 3, 3, 2, dtype=torch.float64, generator=g)
    y, logdet = layer(x, ctx)
    torch.testing.assert_close(layer.inverse(y, ctx), x, atol=1e-8, rtol=1e-8)
    assert not torch.allclose(layer(x, ctx + 1.0)[0], y)
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_inverse_has_implicit_gradients() -> None:
    layer = _coupling()
    y = torch.randn(1, 4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4), requires_grad=True)
    x = layer.inverse(y)
    (grad,) = torch.autograd.grad(x[:, 2:].sum(), y)
    _, logdet = layer(x.detach())
    # d x_b / d y_b is diagonal with entries exp(−per-element log-det): their logs sum to −logdet.
    torch.testing.assert_close(grad[:, 2:].log().sum(), -logdet[0], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({}, 31_443_440),  # flows/run_cifar.py
        ({"attention": False}, 31_443_440),  # ablations/abl_noattn.py
        ({"dequantization": "uniform", "filters": 104}, 32_324_408),  # ablations/abl_nodequant.py
        ({"components": 0, "filters": 108, "dequant_filters": 108}, 32_045_708),  # ablations/abl_nomixlog.py
    ],
)
def test_cifar10_parameter_counts_match_the_official_code(overrides: dict, expected: int) -> None:
    spec = DataSpec(kind="image", shape=(3, 32, 32), levels=256)
    model = build(parse_config({"name": "flowpp", **overrides}), spec)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_config_file_for_cifar10_is_the_paper_model() -> None:
    cfg = yaml.safe_load(Path("configs/flowpp_cifar10.yaml").read_text())
    model = build(parse_config(cfg["model"]), DataSpec(kind="image", shape=(3, 32, 32), levels=256))
    assert sum(p.numel() for p in model.parameters()) == 31_443_440


def test_bad_layout_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="stage"):
        parse_config({"name": "flowpp", "layout": ["columns:4", "shuffle"]})
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="squeeze"):
        build(parse_config({**TINY_FLOWPP, "layout": ["squeeze", "squeeze", "squeeze", "squeeze"]}), DataSpec(kind="image", shape=(1, 8, 8), levels=17))


@pytest.fixture(scope="module")
def digits_flowpp() -> torch.nn.Module:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build(parse_config(TINY_FLOWPP), data.spec)
    model.train()
    with data_init(model), torch.no_grad():
        model.log_prob(torch.from_numpy(data.split("train")[:128]))
    return model.eval()


def test_variational_dequantizer_gives_noise_inside_the_bins(digits_flowpp: torch.nn.Module) -> None:
    x = torch.from_numpy(load_dataset("digits").split("test")[:16])
    noise = digits_flowpp.noise(16, torch.Generator().manual_seed(0))
    u, log_q = digits_flowpp.dequantizer(x, noise)
    assert u.shape == x.shape and bool(((u > 0) & (u < 1)).all())
    assert torch.isfinite(log_q).all()
    a = digits_flowpp.log_prob(x, noise)
    torch.testing.assert_close(digits_flowpp.log_prob(x, noise), a)  # deterministic given the noise
    torch.testing.assert_close(digits_flowpp.log_prob(x[:3], noise[:3]), a[:3], atol=1e-4, rtol=1e-5)  # batch-independent


def test_variational_bound_gradient_reaches_the_dequantizer(digits_flowpp: torch.nn.Module) -> None:
    x = torch.from_numpy(load_dataset("digits").split("train")[:8])
    digits_flowpp.zero_grad()
    digits_flowpp.bits_per_dim(x, generator=torch.Generator().manual_seed(0)).mean().backward()
    grads = [p.grad for p in digits_flowpp.dequantizer.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    digits_flowpp.zero_grad()


def test_iw_bound_not_below_single_sample_bound(digits_flowpp: torch.nn.Module) -> None:
    x = torch.from_numpy(load_dataset("digits").split("test")[:8])
    with torch.no_grad():
        single = torch.stack([digits_flowpp.log_prob(x, generator=torch.Generator().manual_seed(s)) for s in range(8)]).mean(0)
    iw = digits_flowpp.log_prob_iw(x, 16, generator=torch.Generator().manual_seed(0))
    assert float(iw.mean()) >= float(single.mean())


@pytest.mark.parametrize("temperature", [0.7, 0.85, 1.0])
def test_raw_inverse_is_finite(digits_flowpp: torch.nn.Module, temperature: float) -> None:
    z = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * temperature
    with torch.no_grad():
        x = digits_flowpp.flow.inverse(z)
    assert torch.isfinite(x).all()


def test_trained_artifact_samples_finite_images_at_every_temperature(tmp_path: Path) -> None:
    cfg = {"data": "digits", "model": TINY_FLOWPP, "train": {"steps": 30, "batch_size": 32, "eval_every": 30, "eval_batch": 128}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    art = tmp_path / "run" / "artifact"
    manifest = artifact.read_manifest(art)
    assert manifest.architecture["dequantization"] == "variational" and manifest.metrics["bound"] == "variational"
    assert math.isfinite(manifest.metrics["test_bits_per_dim"])
    model = artifact.load(art)
    for t in (0.7, 0.8, 0.9, 1.0):
        with torch.no_grad():
            raw = model.flow.inverse(torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * t)
        assert torch.isfinite(raw).all(), t
        out = tmp_path / f"s{t}.npy"
        result = runner.invoke(app, ["sample", str(art), "-n", "16", "--temperature", str(t), "--out", str(out)])
        assert result.exit_code == 0, result.output
        x = np.load(out)
        assert x.shape == (16, 1, 8, 8) and np.isfinite(x).all() and x.min() >= 0 and x.max() <= 16
    result = runner.invoke(app, ["evaluate", str(art), "--iw-samples", "4"])
    assert result.exit_code == 0, result.output
    assert "iw" in result.output


def test_service_scores_and_samples_flowpp_on_both_backends(tmp_path: Path) -> None:
    """Variational dequantization over HTTP: Gaussian noise from the request seed, the same on torch and ONNX Runtime."""
    from models.artifacts.export import export_artifact
    from models.training.loop import TrainConfig, train
    from tests.server import running_server

    model = {**TINY_FLOWPP, "layout": ["columns:2", "squeeze", "channel:1"], "dequant_couplings": 1}
    train(TrainConfig.model_validate({"data": "digits", "model": model, "train": {"steps": 20, "batch_size": 32, "eval_every": 20}}),
          tmp_path / "run", progress=False)
    version = tmp_path / "repo" / "flowpp" / "1"
    version.parent.mkdir(parents=True)
    (tmp_path / "run" / "artifact").rename(version)
    graphs = export_artifact(version)
    assert graphs.score.inputs[1].distribution == "normal(0,1)"
    rows = load_dataset("digits").split("test")[:5]
    body = {"instances": rows.tolist(), "seed": 7}
    results = {}
    for backend in ("torch", "onnxruntime"):
        with running_server(tmp_path / "repo", tmp_path, FLOWSERVE_BACKEND=backend) as s, s.client() as c:
            assert c.get("/v1/models/flowpp").json()["backend"] == backend
            r = c.post("/v1/models/flowpp/score", json=body)
            assert r.status_code == 200, r.text
            results[backend] = [x["log_prob"] for x in r.json()["results"]]
            again = [x["log_prob"] for x in c.post("/v1/models/flowpp/score", json=body).json()["results"]]
            assert again == results[backend]  # seeded noise: deterministic
            r = c.post("/v1/models/flowpp/sample", json={"n": 3, "seed": 1, "temperature": 0.9})
            assert r.status_code == 200, r.text
            samples = np.array(r.json()["samples"])
            assert samples.shape == (3, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16
    np.testing.assert_allclose(results["onnxruntime"], results["torch"], rtol=1e-4)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_attention_runs_on_a_fused_sdpa_kernel(device: str, layout: torch.memory_format) -> None:
    """Flow++ attention must not fall back to the math kernel (which keeps every T×T matrix for backward):
    with only the fused kernels allowed, forward and backward still run (flash on the CPU; flash or
    memory-efficient on CUDA), for NCHW inputs (q, k, v copied) and channels-last ones (the
    conditioners' layout: q, k, v strided views with the head dimension at stride 1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from models.nets.flowpp import GatedAttention

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(0)
    att = GatedAttention(32, heads=4).to(device)
    x = torch.randn(4, 32, 14, 14, device=device).contiguous(memory_format=layout).requires_grad_()
    pos = torch.zeros(1, 32, 14, 14, device=device)
    with data_init(att), torch.no_grad():
        att.train()
        att(x, pos)
    fused = [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if device == "cuda" else [])
    with sdpa_kernel(fused):
        out = att(x, pos)
        out.square().mean().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = att(x, pos)
    assert torch.allclose(out, ref, atol=1e-5) and x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("d", [1, 2, 4, 8, 12, 16, 24])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_attention_pads_small_heads_without_changing_results(d: int, dtype: torch.dtype) -> None:
    """:func:`models.nets.flowpp.attention` zero-pads head dimensions 2 ≤ d < 16 to 16 on the CPU (the flash
    kernel is faster there) with the scale of d: the output and the gradients of q, k and v are those of plain
    SDPA, and the kernel is handed 16 columns exactly when the padding applies."""
    from torch.profiler import profile

    from models.nets.flowpp import attention

    torch.manual_seed(d)
    q, k, v = (torch.randn(3, 2, 50, d, dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn(3, 2, 50, d, dtype=dtype)
    ref = F.scaled_dot_product_attention(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    with profile(record_shapes=True) as prof:
        out = attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=tol, rtol=0)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=tol, rtol=0)
    widths = {e.input_shapes[0][-1] for e in prof.events() if e.name == "aten::scaled_dot_product_attention"}
    assert widths == {16 if 2 <= d < 16 else d}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_dropout_is_bernoulli_dropout(dtype: torch.dtype) -> None:
    """The conditioners' CPU dropout (uniform draws instead of ``bernoulli_``) drops each element with
    probability p, scales the rest by 1/(1−p) and passes gradients through the same mask; in
    evaluation it is the identity. 10⁶ elements: the dropped fraction's standard error is 4·10⁻⁴."""
    from models.nets.flowpp import Dropout

    drop = Dropout(0.2).train()
    x = torch.full((1000, 1000), 2.0, dtype=dtype, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    assert y.dtype == dtype
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.002
    assert torch.all(y[kept] == torch.tensor(2.0 / 0.8, dtype=dtype))
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept) and torch.all(x.grad[kept] == torch.tensor(1 / 0.8, dtype=dtype))
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x)) and torch.equal(Dropout(0.0).train()(x), x)
