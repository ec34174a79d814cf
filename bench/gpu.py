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

``--acceptance [--out FILE.json]``: every GPU goal in one run, within 8 minutes on one H100
(:func:`acceptance`; ``docs/gpu.md`` says how to run it on a closed machine). With ``--device cpu`` it
runs the same steps at small sizes: a smoke test of the command (``tests/test_acceptance.py``), whose
figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
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
    from service.executor.runners import TorchRunner
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
    from service.core.tasks import dequantization_noise
    from service.executor.runners import TorchRunner
    from service.settings import Settings

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


GOALS = {  # figure: (comparison, goal); a goal named by another figure compares with it
    "flowpp_cifar_tf32_images_per_s": (">=", 600), "flowpp_cifar_tf32_peak_gib": ("<=", 12),
    "flowpp_cifar_bf16_images_per_s": (">=", 600), "flowpp_cifar_bf16_peak_gib": ("<=", 12),
    "butterfly_fused_forward_ms": ("<=", "dense_lu_forward_ms"),
    "digits_samples_per_s": (">=", 20_000),
    "json_1row_best_rows_per_s": (">=", 10_000),
    "json_1row_one_client_p50_ms": ("<=", 1.5),
    "batching_over_max_batch_1_worst": (">=", 1.0),
    "pytest_cuda_failed": ("<=", 0),
}


def sibling(name: str):  # noqa: ANN201 - a module
    """Another script of ``bench/`` as a module, imported by path: ``bench/`` never goes on ``sys.path``, where its
    ``onnx.py`` would hide the ``onnx`` package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _pytest_cuda() -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py",
                          "tests/test_butterfly_kernel.py", "tests/test_flowpp.py"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", out.stdout)}
    return {"pytest_cuda_passed": counts.get("passed", 0), "pytest_cuda_failed": counts.get("failed", 0) + counts.get("error", 0),
            "pytest_cuda_skipped": counts.get("skipped", 0)}


def _butterfly(small: bool) -> dict:
    from models.flows.butterfly_kernel import triton_available

    d = 256 if small else 4096
    x = torch.randn(64, d, device=DEVICE)
    bf = Butterfly((d,), levels=int(math.log2(d)), init="rotation").to(DEVICE)
    out: dict = {"butterfly_d": d}
    with torch.no_grad():
        bf.kernel = "torch"
        ref, _ = bf(x)
        out["butterfly_eager_forward_ms"] = cuda_timed(lambda: bf(x), 20) * 1e3
        if DEVICE == "cuda" and triton_available():
            bf.kernel = "triton"
            fused, _ = bf(x)
            out["butterfly_fused_max_abs_diff"] = float((fused - ref).abs().max())
            out["butterfly_fused_forward_ms"] = cuda_timed(lambda: bf(x), 20) * 1e3
        else:
            out["butterfly_fused_forward_ms"] = None  # the kernel runs on CUDA only
        dense = InvConv1x1LU(d).to(DEVICE)
        out["dense_lu_forward_ms"] = cuda_timed(lambda: dense(x), 5) * 1e3
        w = torch.randn(d, d, device=DEVICE) / math.sqrt(d)
        out["dense_matmul_ms"] = cuda_timed(lambda: x @ w, 20) * 1e3
    return out


def _training_throughput(small: bool) -> dict:
    """Flow++ CIFAR-10 (digits Flow++ on the CPU) training steps at batch 64 (4): images/s and peak memory, TF32 and bf16."""
    out: dict = {}
    batch = 4 if small else 64
    for precision in ("tf32", "bf16"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if small:
            from models.data import load_dataset

            data = load_dataset("digits")
            cfg = yaml.safe_load((ROOT / "configs/flowpp_digits.yaml").read_text())["model"]
            model = build(parse_config(cfg), data.spec).to(DEVICE).train()
            x = torch.from_numpy(data.split("train")[:batch]).float().to(DEVICE)
            with data_init(model), torch.no_grad():
                model.log_prob(x)
        else:
            model = flowpp_cifar(DEVICE).train()
            x = torch.randint(0, 256, (batch, *CIFAR.shape), device=DEVICE).float()
        set_precision(model, "bf16" if precision == "bf16" else "fp32")
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            model.bits_per_dim(x).mean().backward()
            opt.step()

        if DEVICE == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dt = cuda_timed(step, 2 if small else 20, warmup=1 if small else 3)
        name = "flowpp_cifar" if not small else "flowpp_digits"
        out[f"flowpp_cifar_{precision}_images_per_s"] = batch / dt
        out[f"flowpp_cifar_{precision}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None
        out[f"flowpp_cifar_{precision}_model"] = name
        del model, opt
    return out


def _training_run(small: bool, tmp: Path) -> dict:
    """A short training to the end, final evaluation included: 60 Flow++ steps on random CIFAR-shaped images
    (3 Glow digits steps on the CPU)."""
    from models.training.loop import load_config, train

    if small:
        cfg = load_config(ROOT / "configs/glow_digits.yaml")
        steps = 3
    else:
        images = np.random.default_rng(0).integers(0, 256, (2048, 3, 32, 32), dtype=np.uint8)
        np.save(tmp / "cifar_shaped.npy", images)
        cfg = load_config(ROOT / "configs/flowpp_cifar10.yaml").model_copy(update={"data": f"npy:{tmp / 'cifar_shaped.npy'}"})
        steps = 60
    cfg = cfg.model_copy(update={"device": DEVICE, "train": cfg.train.model_copy(update={"eval_every": steps})})
    t0 = time.perf_counter()
    metrics = train(cfg, tmp / "run", max_steps=steps, progress=False)
    return {"training_run_steps": metrics["steps"], "training_run_seconds": time.perf_counter() - t0,
            "training_run_test_bits_per_dim": metrics.get("test_bits_per_dim")}


def _sampling(small: bool) -> dict:
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    n = 64 if small else 1024
    runner = TorchRunner(ROOT / "model_repository/digits-flowpp/1", DEVICE if DEVICE == "cpu" else "cuda:0",
                         Settings(batch_invariant=False, max_batch_size=n))
    z = np.random.default_rng(0).standard_normal((n, runner.manifest.data_spec.dims), dtype=np.float32)
    runner.sample(z)
    reps = 2 if small else 10
    t0 = time.perf_counter()
    for _ in range(reps):
        runner.sample(z)
    return {"digits_samples_per_s": n * reps / (time.perf_counter() - t0), "digits_sampling_path": runner.execution["sample"]}


def _serving(small: bool, tmp: Path) -> dict:
    """The real server on this device, the bundled digits Glow, 1-row JSON: rows/s per client count and the one-client
    p50, with CUDA graphs on and off, and batching against ``max_batch_size=1``."""
    serving = sibling("serving")
    flowserve_cmd, load_level, running = serving.flowserve_cmd, serving.load_level, serving.running

    from models.data import load_dataset
    from tests.server import free_port

    repo = tmp / "repository"
    if not repo.exists():
        shutil.copytree(ROOT / "model_repository/digits", repo / "digits")
    data = load_dataset("digits").split("test")
    levels, seconds = ((1, 8), 1.0) if small else ((1, 64, 256), 5.0)
    device = "cpu" if small else "cuda:0"
    configs = {"batching": {}, "max_batch_1": {"FLOWSERVE_MAX_BATCH_SIZE": "1"}}
    if not small:
        configs["batching_no_cuda_graphs"] = {"FLOWSERVE_CUDA_GRAPHS": "0"}
    out: dict = {}
    for label, extra in configs.items():
        port = free_port()
        env = {"FLOWSERVE_REPOSITORY": str(repo), "FLOWSERVE_DEVICES": device, "FLOWSERVE_BACKEND": "torch", **extra}
        with running(flowserve_cmd(port), "/v2/health/ready", port, env=env, log=tmp / f"server-{label}.log") as (url, _):
            for c in levels:
                r = asyncio.run(load_level(url, "/v1/models/digits/score", c, seconds, 1, data, "json"))
                out[f"json_1row_{label}_{c}_rows_per_s"] = r["rows_per_s"]
                out[f"json_1row_{label}_{c}_p50_ms"] = r["p50"]
                out[f"json_1row_{label}_{c}_errors"] = r["errors"]
    out["json_1row_best_rows_per_s"] = max(out[f"json_1row_batching_{c}_rows_per_s"] for c in levels)
    out["json_1row_one_client_p50_ms"] = out["json_1row_batching_1_p50_ms"]
    out["batching_over_max_batch_1_worst"] = min(out[f"json_1row_batching_{c}_rows_per_s"] / out[f"json_1row_max_batch_1_{c}_rows_per_s"]
                                                 for c in levels)
    return out


def acceptance(out_path: Path | None) -> int:
    """Run every step, print each figure against its goal, write the JSON; exit status 0 when every step ran."""
    small = DEVICE == "cpu"
    figures: dict = {}
    errors: dict[str, str] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        steps = {"pytest -m cuda": _pytest_cuda, "butterfly": lambda: _butterfly(small),
                 "training throughput": lambda: _training_throughput(small), "training run": lambda: _training_run(small, tmp),
                 "sampling": lambda: _sampling(small), "serving": lambda: _serving(small, tmp)}
        for name, fn in steps.items():
            t0 = time.perf_counter()
            try:
                figures.update(fn())
            except Exception as e:  # noqa: BLE001 - one failing step must not hide the others
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                traceback.print_exc()
            print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    goals = []
    for figure, (op, goal) in GOALS.items():
        value = figures.get(figure)
        target = figures.get(goal) if isinstance(goal, str) else goal
        met = None if value is None or target is None else (value >= target if op == ">=" else value <= target)
        goals.append({"figure": figure, "value": value, "goal": f"{op} {goal}", "target": target, "met": met})
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (a smoke test at small sizes: not GPU figures)"
    print(f"\ndevice: {device}; {time.perf_counter() - t_all:.0f} s\n")
    print("| figure | value | goal | met |\n|---|---|---|---|")
    for g in goals:
        value = "—" if g["value"] is None else f"{g['value']:.4g}"
        target = g["target"]
        goal = g["goal"] if target is None or not isinstance(GOALS[g["figure"]][1], str) else f"{g['goal']} ({target:.4g})"
        met = "—" if g["met"] is None else "yes" if g["met"] else "NO"
        print(f"| {g['figure']} | {value} | {goal} | {met} |")
    for name, e in errors.items():
        print(f"step {name!r} failed: {e}")
    report = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": time.perf_counter() - t_all,
              "figures": figures, "goals": goals, "errors": errors}
    if out_path is not None:
        out_path.write_text(json.dumps(report, indent=2))
    return 1 if errors else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (a first look)")
    ap.add_argument("--only", default="1,2,3,4,5", help="sections to run")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: check the script runs, on small sizes")
    ap.add_argument("--acceptance", action="store_true", help="every GPU goal in one run (see the module docstring)")
    ap.add_argument("--out", type=Path, help="--acceptance: write the figures and goals as JSON here")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device; none is visible here", file=sys.stderr)
        sys.exit(2)
    if args.acceptance:
        sys.exit(acceptance(args.out))
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
