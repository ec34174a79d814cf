"""Butterfly layer vs a dense LU-parametrised D×D linear layer, batch 64.

Forward + log-det, inverse, and parameter memory at D ∈ {256, 1024, 4096, 16384}; prints the
ratios and the growth exponents fitted on log-log scales. A log2(D)-level butterfly costs
O(D log D); the dense layer composes W = P L U (O(D³)) for every forward in training and inverts
it (O(D³)) for sampling. The dense layer is skipped where its weights alone would exceed
``--dense-max-bytes`` (16384² floats × 2 factors = 2 GiB). Usage: ``python bench/butterfly.py``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.flows import Butterfly, InvConv1x1LU  # noqa: E402


def timed(fn, budget: float = 1.0) -> float:  # noqa: ANN001
    """Seconds per call: the best of repeated calls within ``budget`` seconds (at least 2 calls)."""
    best, spent = math.inf, 0.0
    for i in range(1000):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent > budget and i >= 1:
            break
    return best


def slope(xs: list[float], ys: list[float]) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", default="256,1024,4096,16384")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--dense-max-bytes", type=float, default=1.0e9)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rows = []
    print(f"device {device}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(f"{'D':>6} {'layer':>10} {'fwd+logdet ms':>14} {'inverse ms':>11} {'params MiB':>11}")
    for d in (int(v) for v in args.dims.split(",")):
        x = torch.randn(args.batch, d, device=device)
        bf = Butterfly((d,), levels=int(math.log2(d)), init="rotation").to(device)
        with torch.no_grad():
            z, _ = bf(x)
            f = timed(lambda: bf(x))
            i = timed(lambda: bf.inverse(z))
        mem = sum(p.numel() * p.element_size() for p in bf.parameters()) / 2**20
        row = {"d": d, "bf_fwd": f, "bf_inv": i, "bf_mem": mem}
        print(f"{d:>6} {'butterfly':>10} {f * 1e3:>14.3f} {i * 1e3:>11.3f} {mem:>11.3f}", flush=True)
        if 2 * d * d * 4 <= args.dense_max_bytes:
            dense = InvConv1x1LU(d).to(device)
            with torch.no_grad():
                z, _ = dense(x)
                f = timed(lambda: dense(x), 2.0)
                i = timed(lambda: dense.inverse(z), 2.0)
            mem = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**20
            row.update(dense_fwd=f, dense_inv=i, dense_mem=mem)
            print(f"{d:>6} {'dense LU':>10} {f * 1e3:>14.3f} {i * 1e3:>11.3f} {mem:>11.3f}", flush=True)
        else:
            print(f"{d:>6} {'dense LU':>10} {'skipped: weights would take ' + format(2 * d * d * 4 / 2**30, '.1f') + ' GiB':>40}")
        rows.append(row)
    print("\nratios dense / butterfly:")
    for r in rows:
        if "dense_fwd" in r:
            print(f"  D={r['d']:>6}: forward+logdet {r['dense_fwd'] / r['bf_fwd']:8.1f}x   inverse {r['dense_inv'] / r['bf_inv']:8.1f}x   parameter memory {r['dense_mem'] / r['bf_mem']:8.1f}x")
    ds = [r["d"] for r in rows]
    print("\nfitted growth exponents (time ∝ D^a):")
    print(f"  butterfly forward a = {slope(ds, [r['bf_fwd'] for r in rows]):.2f}, inverse a = {slope(ds, [r['bf_inv'] for r in rows]):.2f}  (D log D ≈ 1.1–1.2 over this range)")
    dd = [r for r in rows if "dense_fwd" in r]
    if len(dd) >= 2:
        print(f"  dense LU  forward a = {slope([r['d'] for r in dd], [r['dense_fwd'] for r in dd]):.2f}, inverse a = {slope([r['d'] for r in dd], [r['dense_inv'] for r in dd]):.2f}  (composition and inverse are O(D³); apply O(D²))")


if __name__ == "__main__":
    main()
