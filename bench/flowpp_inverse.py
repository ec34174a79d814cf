"""Flow++ inverse: bisection vs safeguarded Newton, inverse error, and sampling speed.

1. The official unit test's mixture (logits .1/.2/4, means −1/0/1, log-scales −5/0/.2) on
   x ∈ [−30, 30]: iterations, time and max |x − F⁻¹(F(x))| for each method, float64.
2. A trained Flow++ artifact (default: ``runs/flowpp_digits/artifact``, or ``--artifact``):
   max |x − f⁻¹(f(x))| over test images (the official ``val_inverr``), and samples/s at
   temperatures 0.7 and 1.0 with each inverse method, batch ``--batch``.

Usage: ``python bench/flowpp_inverse.py [--artifact DIR] [--batch 64] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def reference(method: str) -> tuple[int, float, float]:
    import torch

    from models.flows import InverseOptions, mixture_inverse_cdf, mixture_logit_cdf

    x = torch.linspace(-30.0, 30.0, 100_001, dtype=torch.float64)
    mix = [torch.tensor(v, dtype=torch.float64).expand(len(x), 3) for v in ([0.1, 0.2, 4.0], [-1.0, 0.0, 1.0], [-5.0, 0.0, 0.2])]
    target = mixture_logit_cdf(x, *mix)
    t0 = time.perf_counter()
    inv, iterations = mixture_inverse_cdf(target, *mix, InverseOptions(method=method))
    return iterations, time.perf_counter() - t0, float((inv - x).abs().max())


def set_method(model, method: str) -> list[int]:  # noqa: ANN001
    from models.flows import MixtureCDFCoupling

    couplings = [m for m in model.modules() if isinstance(m, MixtureCDFCoupling)]
    for c in couplings:
        c.inverse_options = dataclasses.replace(c.inverse_options, method=method)
    return couplings


def main() -> None:
    import torch

    from models.artifacts import store as artifact
    from models.data import load_dataset

    ap = argparse.ArgumentParser()
    ap.add_argument("--artifact", default=str(ROOT / "runs" / "flowpp_digits" / "artifact"))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    print("| reference mixture, 100,001 points | iterations | time (s) | max abs error |")
    print("|---|---|---|---|")
    for method in ("bisection", "newton"):
        it, dt, err = reference(method)
        print(f"| {method} | {it} | {dt:.3f} | {err:.2e} |")

    model = artifact.load(args.artifact).eval()
    x = torch.from_numpy(load_dataset(model.manifest.metrics.get("data", "digits")).split("test")).float()
    print(f"\n{args.artifact}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(x)} test images")
    print("\n| inverse | max |x − f⁻¹(f(x))| | mean coupling iterations | samples/s T=0.7 | samples/s T=1.0 |")
    print("|---|---|---|---|---|")
    for method in ("bisection", "newton"):
        couplings = set_method(model, method)
        with torch.no_grad():
            v = x + model.noise(len(x), torch.Generator().manual_seed(0)).sigmoid()  # any point inside the bins
            z, _ = model.flow(v)
            err = float((model.flow.inverse(z) - v).abs().max())
            iters = sum(c.last_inverse_iterations for c in couplings) / len(couplings)
            rates = []
            for t in (0.7, 1.0):
                model.sample(args.batch, t, torch.Generator().manual_seed(0))  # warm-up
                t0 = time.perf_counter()
                for r in range(args.repeats):
                    s = model.sample(args.batch, t, torch.Generator().manual_seed(r))
                    assert torch.isfinite(s).all()
                rates.append(args.repeats * args.batch / (time.perf_counter() - t0))
        print(f"| {method} | {err:.2e} | {iters:.1f} | {rates[0]:.0f} | {rates[1]:.0f} |")


if __name__ == "__main__":
    main()
