"""The paper's structure claims, reproduced small, on this CPU.

(a) Permuted digits: one fixed random permutation of all 64 pixels, train and test. ButterflyFlow
    (full butterflies) vs Glow, both on permuted and unpermuted digits, the same wall-clock budget.
(b) Periodic signals: 2-channel windows of a documented periodic family (below); ButterflyFlow
    (tied butterflies) vs Glow waveform flows, NLL per dimension (nats) and parameter counts.

Periodic family (until the MIMIC-style generator exists): for each window, a fundamental
frequency f ~ U(1.0, 1.6) cycles per 64 steps and phase φ ~ U(0, 2π); channel 0 (PLETH-like) is
sin(ω t + φ) + 0.3 sin(2ω t + φ + 0.7), channel 1 (ABP-like) is a 0.4-step-delayed, skewed pulse
sin(ω t + φ − 0.4)² − 0.5 + 0.2 sin(3ω t + φ); plus N(0, 0.02²) noise. Each of the four runs
trains for ``--minutes`` (two at a time, one thread each). Usage: ``python bench/butterfly_structure.py``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def periodic_windows(n: int, t: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    steps = np.arange(t)[None, :]
    f = rng.uniform(1.0, 1.6, (n, 1))
    phi = rng.uniform(0, 2 * np.pi, (n, 1))
    w = 2 * np.pi * f / 64
    pleth = np.sin(w * steps + phi) + 0.3 * np.sin(2 * w * steps + phi + 0.7)
    abp = np.sin(w * steps + phi - 0.4) ** 2 - 0.5 + 0.2 * np.sin(3 * w * steps + phi)
    x = np.stack([pleth, abp], 1) + rng.normal(0, 0.02, (n, 2, t))
    return x.astype(np.float32)


def run(job: tuple[str, dict, str, float]) -> tuple[str, dict]:
    import torch

    torch.set_num_threads(1)
    from models.training.loop import TrainConfig, train

    name, model, data, minutes = job
    cfg = TrainConfig.model_validate({"data": data, "model": model, "seed": 0, "train": {
        "steps": 100000, "max_minutes": minutes, "batch_size": 64, "lr": 0.002, "warmup": 100, "ema": 0.99, "eval_every": 100}})
    with tempfile.TemporaryDirectory() as tmp:
        return name, train(cfg, tmp, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    glow = {"name": "glow", "levels": 2, "steps": 8, "hidden": 64}
    bf = {"name": "butterflyflow", "levels": 2, "steps": 8, "hidden": 64, "butterfly_levels": "full", "init": "rotation"}
    with tempfile.TemporaryDirectory() as tmp:
        npy = Path(tmp) / "periodic.npy"
        np.save(npy, periodic_windows(3000, args.window))
        levels = int(np.log2(2 * args.window))  # tied butterflies: 2·T values per window
        jobs = [
            ("glow/digits", glow, "digits", args.minutes),
            ("butterflyflow/digits", bf, "digits", args.minutes),
            ("glow/permuted", glow, "digits-permuted:0", args.minutes),
            ("butterflyflow/permuted", bf, "digits-permuted:0", args.minutes),
            ("glow/periodic", {"name": "waveform", "levels": 2, "steps": 2, "hidden": 64}, f"waveform:{npy}", args.minutes),
            ("butterflyflow/periodic", {"name": "waveform", "levels": 2, "steps": 2, "hidden": 16,
                                        "butterfly_levels": [levels - 1, levels - 2]}, f"waveform:{npy}", args.minutes),
        ]
        with mp.get_context("spawn").Pool(2) as pool:
            results = dict(pool.map(run, jobs))
    print(f"(a) digits, test bits/dim after {args.minutes:g} min each (1 thread):")
    print(f"{'model':>14} {'params':>9} {'unpermuted':>11} {'permuted':>9}")
    for m in ("glow", "butterflyflow"):
        a, b = results[f"{m}/digits"], results[f"{m}/permuted"]
        print(f"{m:>14} {a['parameters']:>9} {a['test_bits_per_dim']:>11.3f} {b['test_bits_per_dim']:>9.3f}")
    print(f"\n(b) periodic 2-channel windows of {args.window} steps, test NLL per dim (nats) after {args.minutes:g} min:")
    for m in ("glow", "butterflyflow"):
        r = results[f"{m}/periodic"]
        print(f"{m:>14} {r['parameters']:>9} params  {r['test_nll_nats'] / (2 * args.window):>8.3f} nats/dim")


if __name__ == "__main__":
    main()
