"""The fused Triton butterfly kernel against the PyTorch levels (the reference), at float32 tolerance.

On a machine without CUDA the kernel runs in Triton's interpreter (the same kernel code, executed
with numpy); the CUDA tests run it compiled.
"""

from __future__ import annotations

import pytest
import torch

from models.flows import Butterfly
from models.flows.butterfly_kernel import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

CASES = [  # shape, levels, partitions, tied, layout
    ((64,), 6, 1, False, "channel_major"),  # a full butterfly
    ((3, 8, 8), 6, 1, False, "channel_last"),  # D = 192 = 3 · 2^6: the odd factor rides along (R = 3)
    ((3, 8, 8), 4, 2, True, "channel_major"),  # block-wise, tied blocks
    ((2, 4, 8), 2, 4, False, "channel_major"),  # levels in the middle: partitions and R = 4 together
]


def pair(shape: tuple[int, ...], levels: int, partitions: int, tied: bool, layout: str, device: str = "cpu") -> tuple[Butterfly, Butterfly]:
    """The same random layer twice: PyTorch levels, and the fused kernel."""
    torch.manual_seed(levels + partitions)
    ref = Butterfly(shape, levels, tied=tied, init="rotation", layout=layout, partitions=partitions, kernel="torch")
    with torch.no_grad():
        for f in ref.factors:
            for p in (f.s1, f.s2, f.t):
                p.normal_(0, 0.3)
    fused = Butterfly(shape, levels, tied=tied, init="rotation", layout=layout, partitions=partitions, kernel="triton")
    fused.load_state_dict(ref.state_dict())
    return ref.to(device), fused.to(device)


def check_against_reference(ref: Butterfly, fused: Butterfly, x: torch.Tensor) -> None:
    xr, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (yr, ldr), (yf, ldf) = ref(xr), fused(xf)
    torch.testing.assert_close(yf, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ldf, ldr)
    w = torch.randn_like(yr)
    ((yr * w).sum() + ldr.sum()).backward()
    ((yf * w).sum() + ldf.sum()).backward()
    torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-5)
    for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
        torch.testing.assert_close(pf.grad, pr.grad, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(fused.inverse(yr), ref.inverse(yr), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused.inverse(yf), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-L{c[1]}-P{c[2]}{'-tied' if c[3] else ''}-{c[4]}")
def test_interpreted_kernel_matches_reference(case: tuple) -> None:
    ref, fused = pair(*case)
    check_against_reference(ref, fused, torch.randn(5, *case[0]))


def test_auto_keeps_pytorch_levels_off_cuda() -> None:
    layer = Butterfly((64,), 6)
    assert layer.kernel == "auto" and not layer._fused(torch.zeros(2, 64))


def test_inverse_under_autograd_uses_the_differentiable_reference() -> None:
    ref, fused = pair((16,), 4, 1, False, "channel_major")
    y = torch.randn(3, 16, requires_grad=True)
    x = fused.inverse(y)  # the kernel's inverse has no backward: the PyTorch levels run instead
    x.sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    torch.testing.assert_close(x, ref.inverse(y))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("d", [1024, 4096, 16384])  # 16384: 14 levels, two launches of 7
def test_compiled_kernel_matches_reference_on_cuda(d: int) -> None:
    levels = d.bit_length() - 1
    ref, fused = pair((d,), levels, 1, False, "channel_major", device="cuda")
    check_against_reference(ref, fused, torch.randn(64, d, device="cuda"))
    odd_ref, odd_fused = pair((3, 32, 32), 10, 1, False, "channel_last", device="cuda")  # CIFAR's D = 3 · 2^10
    check_against_reference(odd_ref, odd_fused, torch.randn(16, 3, 32, 32, device="cuda"))
    auto = Butterfly((d,), levels).cuda()
    assert auto._fused(torch.zeros(1, d, device="cuda"))


def test_a_kernel_that_cannot_be_built_falls_back_to_pytorch_levels(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """On a machine whose Triton cannot build the kernel (old compiler, too little shared memory), ``auto``
    layers keep working on the PyTorch levels and say so once; a forced ``triton`` layer raises."""
    import triton

    from models.flows import butterfly_kernel

    def cannot_build(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise triton.compiler.errors.CompilationError("", None, "unsupported here")

    monkeypatch.setattr(butterfly_kernel, "butterfly_forward", cannot_build)
    monkeypatch.setattr(Butterfly, "_fused", lambda self, x: self.kernel != "torch")  # as if on CUDA
    ref, auto = pair((16,), 4, 1, False, "channel_major")
    auto.kernel = "auto"
    x = torch.randn(3, 16)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(auto(x)[0], ref(x)[0])
    assert auto.kernel == "torch" and "cannot run here" in caplog.text
    forced = pair((16,), 4, 1, False, "channel_major")[1]
    with pytest.raises(triton.compiler.errors.CompilationError):
        forced(x)


@pytest.mark.parametrize("levels", [5, 6])
def test_layers_deeper_than_one_launch_run_as_level_groups(levels: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """More levels than one launch takes (12 on a GPU; 2 here): consecutive level groups, forward, backward and inverse."""
    from models.flows import butterfly_kernel

    monkeypatch.setattr(butterfly_kernel, "MAX_LEVELS", 2)
    assert [n for _, n in butterfly_kernel.level_groups(levels)] == ([2, 2, 1] if levels == 5 else [2, 2, 2])
    ref, fused = pair((2, 32), levels, 1, False, "channel_major")
    check_against_reference(ref, fused, torch.randn(4, 2, 32))
