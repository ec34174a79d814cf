"""The small Flow++'s training step on 28×28 inputs, this checkout against an earlier one, side by side.

``configs/flowpp_digits.yaml``'s model (or ``--config``'s) on MNIST-shaped data (1×28×28, 256
levels; random pixels: a step's cost does not depend on them), batch 64, ``--threads`` torch
threads: data-dependent init, one warm-up step, then ``--steps`` timed steps (zero_grad, bits/dim,
backward, Adam). Each checkout runs in its own process; the checkouts alternate (ABBA order) for
``--rounds`` rounds, so a slow hour of the machine hits both alike. Prints each round's median step
per checkout, the ratio baseline ÷ this checkout per round, and the median and worst ratio.

The default baseline, ``933b7db^``, is the code as the "Flows at GPU speed" issue measured it
(6.1 s a step on its 2-core machine, attention on the math kernel, float64 mixtures).

Usage: ``python bench/flowpp_step.py [--baseline-ref 933b7db^] [--rounds 4] [--steps 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(root: Path, config: Path, steps: int, threads: int) -> None:
    """Time ``steps`` training steps with the code under ``root``; print ``{"seconds": [...], "peak_rss_gb": x}``."""
    import resource

    sys.path.insert(0, str(root))
    import torch
    import yaml

    import models
    from models.architectures import build, parse_config
    from models.spec import DataSpec

    if not Path(models.__file__).resolve().is_relative_to(root.resolve()):  # e.g. an editable install's finder won
        raise SystemExit(f"models imported from {models.__file__}, not from {root}")
    torch.set_num_threads(threads)
    spec = DataSpec(kind="image", shape=(1, 28, 28), levels=256, source="mnist")
    torch.manual_seed(0)
    model = build(parse_config(yaml.safe_load(config.read_text())["model"]), spec)
    x = torch.randint(0, 256, (64, *spec.shape), generator=torch.Generator().manual_seed(1)).float()
    try:  # explicit data-dependent init (since 933b7db)
        from models.flows import data_init

        with data_init(model), torch.no_grad():
            model.log_prob(x)
    except ImportError:  # before: the first forward in training mode initialises
        model.train()
        with torch.no_grad():
            model.log_prob(x)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model.bits_per_dim(x).mean().backward()
        opt.step()

    step()  # warm-up: allocator, oneDNN primitives
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"seconds": seconds, "peak_rss_gb": peak}))


def run_worker(root: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(root), "--config", str(args.config),
           "--steps", str(args.steps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline-ref", default="933b7db^", help="git ref of the code to compare with")
    ap.add_argument("--rounds", type=int, default=4, help="rounds; each runs both checkouts once")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "flowpp_digits.yaml")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        worker(args.worker, args.config, args.steps, args.threads)
        return

    sys.path.insert(0, str(ROOT / "bench"))
    from serving import baseline_tree

    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"Flow++ step, {args.config.name}'s model, 1×28×28, batch 64, {args.threads} threads, "
          f"{args.steps} timed steps per process, {args.rounds} rounds (ABBA)")
    print(f"this checkout: {head} (working tree); baseline: {args.baseline_ref}\n")
    print(f"{'round':>5} {'baseline s/step':>16} {'this s/step':>12} {'ratio':>7} {'baseline GB':>12} {'this GB':>8}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp, baseline_tree(args.baseline_ref, Path(tmp) / "baseline") as base:
        assert base is not None
        for r in range(args.rounds):
            order = [("base", base), ("this", ROOT)]
            if r % 2:
                order.reverse()
            got = {name: run_worker(root, args) for name, root in order}
            b, t = (statistics.median(got[k]["seconds"]) for k in ("base", "this"))
            ratios.append(b / t)
            print(f"{r + 1:>5} {b:>16.2f} {t:>12.2f} {b / t:>6.2f}× {got['base']['peak_rss_gb']:>12.2f} "
                  f"{got['this']['peak_rss_gb']:>8.2f}", flush=True)
    print(f"\nratio baseline ÷ this checkout: median {statistics.median(ratios):.2f}×, worst {min(ratios):.2f}×, "
          f"best {max(ratios):.2f}× over {len(ratios)} rounds")


if __name__ == "__main__":
    main()
