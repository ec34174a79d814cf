"""What the library does on a CUDA machine, in one run: ``python bench/gpu.py [--quick]``.

Prints, each section on its own (a failing section says why and the rest go on):

1. Flow++ CIFAR-10 training (``configs/flowpp_cifar10.yaml``, 31.4M parameters, batch 64, random
   CIFAR-shaped images: throughput does not depend on the pixels): images/s and peak memory for
   fp32, TF32 and bf16 conditioners, eager and ``torch.compile``d;
2. Glow digits training (``configs/glow_digits.yaml``): steps/s on the GPU and on the CPU;
3. sampling: samples/s of the bundled digits Flow++ and of a CIFAR-10 Flow++, eager and as the
   service runs it (CUDA graphs);
4. the butterfly layer, eager (PyTorch per level) and fused (one Triton launch per direction), vs
   the dense LU layer vs a dense matmul, D = 1024 … 16384, batch 64: forward + log-det, inverse,
   and forward + backward, milliseconds;
5. scoring rows/s of the bundled digits Glow as the service's runner runs it, at batch 1, 64 and
   1024, with CUDA graphs and without, and the batch-1 latency of each.

Results go into ``docs/benchmarks.md`` with the device named. Needs CUDA; on a machine without it,
it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.architectures import build, parse_config  # noqa: E402
from models.flows import Butterfly, InvConv1x1LU, data_init  # noqa: E402
from models.precision import set_precision  # noqa: E402
from models.spec import DataSpec  # noqa: E402

CIFAR = DataSpec(kind="image", shape=(3, 32, 32), levels=256, source="cifar10")


DEVICE = "cuda"  # --device cpu runs every section on the CPU: a smoke test of this script, not a benchmark


def cuda_timed(fn: Callable[[], object], repeats: int, warmup: int = 3, device: str | None = None) -> float:
    """Seconds per call on ``device`` (default: the run's): CUDA events around ``repeats`` calls after
    ``warmup`` on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    if (device or DEVICE) != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / repeats


def flowpp_cifar(device: str, init: bool = True) -> torch.nn.Module:
    cfg = yaml.safe_load((ROOT / "configs/flowpp_cifar10.yaml").read_text())["model"]
    torch.manual_seed(0)
    model = build(parse_config(cfg), CIFAR).to(device)
    if init:
        with data_init(model), torch.no_grad():
            model.log_prob(torch.randint(0, 256, (64, *CIFAR.shape), device=device).float())
    return model


def section_flowpp_training(quick: bool) -> None:
    print("\n## 1. Flow++ CIFAR-10 training, batch 64")
    print(f"{'variant':<24} {'ms/step':>9} {'images/s':>9} {'peak GiB':>9}")
    steps = 5 if quick else 20
    for precision, tf32, compiled in (("fp32", False, False), ("fp32", True, False), ("bf16", True, False),
                                      ("fp32", True, True), ("bf16", True, True)):
        label = f"{'tf32' if tf32 and precision == 'fp32' else precision}{' compiled' if compiled else ''}"
        try:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
            model = flowpp_cifar(DEVICE).train()
            set_precision(model, precision)
            opt = torch.optim.Adam(model.parameters(), lr=3e-4, fused=True)
            x = torch.randint(0, 256, (64, *CIFAR.shape), device=DEVICE).float()

            def loss() -> torch.Tensor:
                return model.bits_per_dim(x).mean()

            fn = torch.compile(loss, dynamic=False) if compiled else loss

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                fn().backward()
                opt.step()

            if DEVICE == "cuda":
                torch.cuda.reset_peak_memory_stats()
            dt = cuda_timed(step, steps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else math.nan
            print(f"{label:<24} {dt * 1e3:>9.1f} {64 / dt:>9.1f} {peak:>9.2f}", flush=True)
            del model, opt
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001 - one variant failing must not hide the others
            print(f"{label:<24} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def section_glow(quick: bool) -> None:
    print("\n## 2. Glow digits training, batch 64: steps/s")
    from models.data import load_dataset

    data = load_dataset("digits")
    cfg = yaml.safe_load((ROOT / "configs/glow_digits.yaml").read_text())["model"]
    x_all = torch.from_numpy(data.split("train"))
    for device in (DEVICE, "cpu") if DEVICE == "cuda" else ("cpu",):
        torch.manual_seed(0)
        model = build(parse_config(cfg), data.spec).to(device).train()
        with data_init(model), torch.no_grad():
            model.log_prob(x_all[:256].to(device))
        opt = torch.optim.Adam(model.parameters(), lr=2e-3, fused=True)
        x = x_all[:64].to(device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model.bits_per_dim(x).mean().backward()
            opt.step()

        n = 20 if quick else 100
        dt = cuda_timed(step, n if device == "cuda" else n // 4, device=device)
        print(f"  {device}: {1 / dt:8.1f} steps/s", flush=True)


def section_sampling(quick: bool) -> None:
    print("\n## 3. Sampling, samples/s")
    from models import load
    from service.runners import TorchRunner
    from service.settings import Settings

    path = ROOT / "model_repository/digits-flowpp/1"
    model = load(str(path), DEVICE)
    for n in (64, 1024):
        z = torch.randn(n, model.spec.dims, device=DEVICE)
        with torch.no_grad():
            dt = cuda_timed(lambda: model.flow.inverse(z), 3 if quick else 10)
        print(f"  digits Flow++ eager, batch {n:>5}: {n / dt:10.0f} samples/s", flush=True)
    for graphs in (True, False):
        runner = TorchRunner(path, DEVICE if DEVICE == "cpu" else "cuda:0", Settings(cuda_graphs=graphs, batch_invariant=False, max_batch_size=1024))
        z = np.random.default_rng(0).standard_normal((1024, runner.manifest.data_spec.dims), dtype=np.float32)
        runner.sample(z)
        t0 = time.perf_counter()
        reps = 3 if quick else 10
        for _ in range(reps):
            runner.sample(z)
        dt = (time.perf_counter() - t0) / reps
        print(f"  digits Flow++ service runner ({runner.execution['sample']}), batch 1024: {1024 / dt:10.0f} samples/s", flush=True)
    model = flowpp_cifar(DEVICE).eval()
    z = torch.randn(64, CIFAR.dims, device=DEVICE)
    with torch.no_grad():
        dt = cuda_timed(lambda: model.flow.inverse(z), 2 if quick else 5, warmup=1)
    print(f"  CIFAR-10 Flow++ eager, batch 64: {64 / dt:10.1f} samples/s", flush=True)


def section_butterfly(quick: bool) -> None:
    """Eager PyTorch levels vs the fused Triton kernel (one launch per direction) vs dense LU vs a matmul."""
    from models.flows.butterfly_kernel import triton_available

    fused_ok = DEVICE == "cuda" and triton_available()  # on the CPU the kernel only runs interpreted
    print("\n## 4. Butterfly (eager levels / fused Triton kernel) vs dense LU vs dense matmul, batch 64 (ms)")
    print(f"{'D':>6} {'eager fwd+ld':>13} {'fused fwd+ld':>13} {'eager inv':>10} {'fused inv':>10} {'eager f+b':>10} "
          f"{'fused f+b':>10} {'dense LU fwd':>13} {'dense LU inv':>13} {'matmul':>8} {'fused/matmul':>13}")
    dims = (1024, 4096, 16384) if quick else (1024, 2048, 4096, 8192, 16384)
    for d in dims if DEVICE == "cuda" else (256, 1024):
        x = torch.randn(64, d, device=DEVICE)
        bf = Butterfly((d,), levels=int(math.log2(d)), init="rotation").to(DEVICE)
        w = torch.randn(d, d, device=DEVICE) / math.sqrt(d)
        cells = {}
        for kernel in ("torch", "triton") if fused_ok else ("torch",):
            bf.kernel = kernel
            with torch.no_grad():
                z, _ = bf(x)
                cells[kernel, "f"] = cuda_timed(lambda: bf(x), 20)
                cells[kernel, "i"] = cuda_timed(lambda: bf.inverse(z), 20)
            xg = x.clone().requires_grad_(True)

            def step() -> None:
                y, ld = bf(xg)
                (y.square().sum() - ld.sum()).backward()
            cells[kernel, "b"] = cuda_timed(step, 10)
        with torch.no_grad():
            m = cuda_timed(lambda: x @ w, 20)
            dense_f = dense_i = math.nan
            if d <= 8192:
                dense = InvConv1x1LU(d).to(DEVICE)
                zd, _ = dense(x)
                dense_f, dense_i = cuda_timed(lambda: dense(x), 5), cuda_timed(lambda: dense.inverse(zd), 5)
        ms = {k: v * 1e3 for k, v in cells.items()}
        nan = math.nan
        print(f"{d:>6} {ms['torch', 'f']:>13.3f} {ms.get(('triton', 'f'), nan):>13.3f} {ms['torch', 'i']:>10.3f} "
              f"{ms.get(('triton', 'i'), nan):>10.3f} {ms['torch', 'b']:>10.3f} {ms.get(('triton', 'b'), nan):>10.3f} "
              f"{dense_f * 1e3:>13.3f} {dense_i * 1e3:>13.3f} {m * 1e3:>8.3f} {ms.get(('triton', 'f'), nan) / (m * 1e3):>13.2f}",
              flush=True)


def section_scoring(quick: bool) -> None:
    print("\n## 5. Scoring, the service's runner (bundled digits Glow, torch)")
    from service.runners import TorchRunner
    from service.settings import Settings
    from service.tasks import dequantization_noise

    path = ROOT / "model_repository/digits/1"
    for graphs in (True, False):
        runner = TorchRunner(path, DEVICE if DEVICE == "cpu" else "cuda:0", Settings(cuda_graphs=graphs, batch_invariant=False, max_batch_size=1024))
        cells = []
        for b in (1, 64, 1024):
            x = runner.manifest.data_spec.random_examples(b, seed=b).astype(np.float32)
            noise = dequantization_noise(runner.manifest, b, 0)
            for _ in range(5):
                runner.log_prob(x, noise)
            times = []
            for _ in range(20 if quick else 200):
                t0 = time.perf_counter()
                runner.log_prob(x, noise)
                times.append(time.perf_counter() - t0)
            cells.append(f"batch {b}: {b / np.mean(times):9.0f} rows/s (p50 {np.median(times) * 1e3:.3f} ms)")
        print(f"  {runner.execution['score']}: " + "; ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a first look)")
    ap.add_argument("--only", default="1,2,3,4,5", help="sections to run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script runs, on small sizes")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none is visible here", file=sys.stderr)
        sys.exit(2)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (a smoke test: these are not GPU figures)"
    print(f"device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sections = {"1": section_flowpp_training, "2": section_glow, "3": section_sampling, "4": section_butterfly, "5": section_scoring}
    for key in args.only.split(","):
        try:
            sections[key](args.quick)
        except Exception:  # noqa: BLE001
            print(f"section {key} failed:\n{traceback.format_exc()}")


if __name__ == "__main__":
    main()
