"""Flow++ ablations at (near) equal parameter count and equal wall-clock budget.

Variants, as the paper's Table 2 (CIFAR-10 ordering: full 3.165 < no attention 3.193 < affine
3.200 < uniform 3.292):

* ``full``: ``configs/flowpp_digits.yaml`` (or ``--config``) as is;
* ``uniform``: uniform instead of variational dequantization, filters raised to match the parameters;
* ``affine``: affine instead of mixture-CDF couplings (K = 0), filters (main and dequantizer) raised;
* ``no_attention``: gated pointwise MLP instead of self-attention (same parameter count by construction);
* ``glow``: our Glow baseline (``configs/glow_digits.yaml``'s model) under the same budget.

Widening mirrors the official ablations (``abl_nodequant.py`` 96→104 filters, ``abl_nomixlog.py``
96→108): the smallest filter count (a multiple of the head count) whose parameter total reaches
the full model's, so an ablation never has fewer parameters than the full model. Every run trains
for ``--minutes`` of wall clock on one thread, two runs at a time, and reports test bits/dim (the
variational bound, and the importance-weighted bound with ``--iw`` samples).

Usage: ``python bench/flowpp_ablation.py [--minutes 4] [--data digits] [--config configs/flowpp_digits.yaml]``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parameters(model: dict[str, Any], data: str) -> int:
    from models.architectures import build, parse_config
    from models.data import load_dataset

    return sum(p.numel() for p in build(parse_config(model), load_dataset(data).spec).parameters())


def widened(model: dict[str, Any], target: int, data: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Raise the filter counts in ``keys`` (in steps of the head count) until the parameters reach ``target``.

    Never fewer parameters than the full model: where the steps are coarse, the ablation gets more.
    """
    step = model.get("heads", 4)
    m = dict(model)
    while parameters(m, data) < target:
        m = {**m, **{k: m.get(k, 96) + step for k in keys}}
    return m


def variants(full: dict[str, Any], glow: dict[str, Any], data: str) -> dict[str, dict[str, Any]]:
    n = parameters(full, data)
    return {
        "full": full,
        "no_attention": {**full, "attention": False},
        "affine": widened({**full, "components": 0}, n, data, ("filters", "dequant_filters")),
        "uniform": widened({**full, "dequantization": "uniform"}, n, data, ("filters",)),
        "glow": glow,
    }


def run(job: tuple[str, dict, str, dict, float, int, int]) -> tuple[str, dict]:
    import torch

    torch.set_num_threads(1)
    from models.data import load_dataset
    from models.training.evaluate import evaluate
    from models.training.loop import TrainConfig, train

    name, model, data, optim, minutes, iw, seed = job
    cfg = TrainConfig.model_validate({"data": data, "model": model, "seed": seed,
                                      "train": {**optim, "steps": 1_000_000, "max_minutes": minutes}})
    with tempfile.TemporaryDirectory() as tmp:
        metrics = train(cfg, tmp, progress=False)
        if iw > 1:
            from models.artifacts import store as artifact

            final = artifact.load(Path(tmp) / "artifact")
            metrics["test_iw_bits_per_dim"] = evaluate(final, load_dataset(data).split("test"), 64, seed=0, iw_samples=iw)["bits_per_dim"]
    return name, metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget per run")
    ap.add_argument("--data", default=None, help="image data spec (default: the config's)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "flowpp_digits.yaml"))
    ap.add_argument("--glow-config", default=str(ROOT / "configs" / "glow_digits.yaml"))
    ap.add_argument("--iw", type=int, default=16, help="importance samples for the IW bound (1: skip)")
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--seed", type=int, default=0, help="initialisation and batch-order seed (evaluation noise stays seeded by it)")
    args = ap.parse_args()
    cfg = yaml.safe_load(Path(args.config).read_text())
    glow_cfg = yaml.safe_load(Path(args.glow_config).read_text())
    data = args.data or cfg["data"]
    optim = {k: v for k, v in cfg["train"].items() if k not in ("steps", "max_minutes")}
    table = variants(cfg["model"], glow_cfg["model"], data)
    if args.only:
        table = {k: v for k, v in table.items() if k in args.only}
    counts = {k: parameters(v, data) for k, v in table.items()}
    jobs = [(k, v, data, optim if k != "glow" else {kk: vv for kk, vv in glow_cfg["train"].items() if kk not in ("steps", "max_minutes")},
             args.minutes, args.iw, args.seed) for k, v in table.items()]
    print(f"data {data}, {args.minutes} min per run (1 thread, 2 runs at a time), seed {args.seed}")
    with mp.get_context("spawn").Pool(2) as pool:
        results = dict(pool.map(run, jobs, chunksize=1))
    print(f"\n| variant | filters | parameters | steps | test bits/dim (variational) | test bits/dim (IW, S={args.iw}) |")
    print("|---|---|---|---|---|---|")
    for k in table:
        m = results[k]
        iw = f"{m['test_iw_bits_per_dim']:.3f}" if "test_iw_bits_per_dim" in m else "–"
        print(f"| {k} | {table[k].get('filters', table[k].get('hidden', ''))} | {counts[k]:,} | {m['steps']} | {m['test_bits_per_dim']:.3f} | {iw} |")


if __name__ == "__main__":
    main()
