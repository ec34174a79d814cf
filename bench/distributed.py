"""Data-parallel training throughput: one process against ``torchrun`` with more ranks, side by side.

On the CPU (gloo): the Glow digits config (``configs/glow_digits.yaml``, batch 64), 1 and 2 ranks, each
rank with one intra-op thread, in interleaved rounds; steps/s of the global batch from the run's own
``train_seconds``. On a machine with N CUDA devices (NCCL, ``--cuda``): Flow++ CIFAR-10
(``configs/flowpp_cifar10.yaml``, batch 64 per GPU, random CIFAR-shaped images) on 1, 2, 4 … N GPUs:
images/s and the scaling efficiency ``(images/s on n) / (n · images/s on 1)``.

Usage: ``python bench/distributed.py [--steps 300] [--rounds 2] [--cuda]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def run(ranks: int, cfg: Path, out: Path, env: dict[str, str]) -> dict:
    """Train ``cfg`` on ``ranks`` processes (``torchrun`` when more than one); the final metrics."""
    from tests.server import free_port

    launcher = [sys.executable, "-m", "models.cli"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=bench", "-m", "models.cli"]
    r = subprocess.run([*launcher, "train", str(cfg), "--out", str(out)], env={**os.environ, **env}, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["final"] for r in reversed(rows) if "final" in r)


def cpu(steps: int, rounds: int, tmp: Path) -> None:
    base = yaml.safe_load((ROOT / "configs/glow_digits.yaml").read_text())
    base.update(device="cpu")
    base["train"].update(steps=steps, eval_every=steps, micro_batch=base["train"]["batch_size"])
    cfg = tmp / "glow.yaml"
    cfg.write_text(yaml.safe_dump(base))
    env = {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    rates: dict[int, list[float]] = {1: [], 2: []}
    for k in range(rounds):
        for ranks in rates:
            m = run(ranks, cfg, tmp / f"run-{ranks}-{k}", env)
            rates[ranks].append(m["steps"] / m["train_seconds"])
    print(f"\n### Glow digits on the CPU (gloo), global batch {base['train']['batch_size']}, {steps} steps, "
          f"one thread per rank, {rounds} interleaved rounds\n")
    print("| ranks | steps/s per round | mean | vs 1 rank |\n|---|---|---|---|")
    one = float(np.mean(rates[1]))
    for ranks, r in rates.items():
        print(f"| {ranks} | {', '.join(f'{v:.1f}' for v in r)} | {np.mean(r):.1f} | {np.mean(r) / one:.2f}× |")
    print(f"\nThis machine has {os.cpu_count()} cores: two ranks run on both of them, one rank on one. Each step also "
          "all-reduces the gradients between the ranks (gloo over loopback), and validation at the end is shared.")


def cuda(steps: int, tmp: Path) -> None:
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        print("no CUDA device: the multi-GPU figures are measured on the next GPU machine")
        return
    images = np.random.default_rng(0).integers(0, 256, (8192, 3, 32, 32), dtype=np.uint8)
    np.save(tmp / "cifar_shaped.npy", images)
    base = yaml.safe_load((ROOT / "configs/flowpp_cifar10.yaml").read_text())
    base.update(device="cuda", data=f"npy:{tmp / 'cifar_shaped.npy'}")
    print(f"\n### Flow++ CIFAR-10 on {torch.cuda.get_device_name()} (NCCL), 64 images per GPU, {steps} steps\n")
    print("| GPUs | images/s | scaling efficiency |\n|---|---|---|")
    one = None
    ranks = 1
    while ranks <= n:
        base["train"].update(steps=steps, eval_every=steps, batch_size=64 * ranks)
        cfg = tmp / f"flowpp-{ranks}.yaml"
        cfg.write_text(yaml.safe_dump(base))
        m = run(ranks, cfg, tmp / f"gpu-{ranks}", {})
        rate = m["steps"] * 64 * ranks / m["train_seconds"]
        one = one or rate
        print(f"| {ranks} | {rate:.0f} | {rate / (ranks * one):.2f} |")
        ranks *= 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cuda", action="store_true", help="Flow++ CIFAR-10 on 1…N GPUs instead of the CPU figures")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        if args.cuda:
            cuda(args.steps, Path(t))
        else:
            cpu(args.steps, args.rounds, Path(t))
            print("\nNo multi-GPU figures here (no CUDA device); `python bench/distributed.py --cuda` measures them on a GPU machine.")


if __name__ == "__main__":
    main()
