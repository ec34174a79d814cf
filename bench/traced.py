"""Torch scoring on the CPU: eager vs the traced graph (``service.traced``), as the service runs them.

For each bundled model (torch backend, one thread unless ``--threads``), side by side in one run:

* ``eager``: the model in eager PyTorch, no tiles (what ``FLOWSERVE_BATCH_INVARIANT=0
  FLOWSERVE_TRACE_CPU=0`` serves);
* ``eager, tiles``: eager in tiles of 64 rows (the default before the traced graph);
* ``traced``: the default: the traced graph, with tiles only where the load check asks for them;
* ``traced, 1x1 conv``: the same, with channel mixing as oneDNN 1×1 convolutions at every channel
  count (``models.flows.linear.SUM_MAX_CHANNELS = 0``), as before the multiply-sum for few channels;

rows/s at batch 1, 16, 64 and 256 (the best call within ``--seconds``), the ratios of traced to the others, and how many of 40 probe
rows change in the last bits with their batch-mates (batches of 2–256, shifted positions).
Usage: ``python bench/traced.py [--seconds 1] [--threads 1] [--models digits,mimic-vitals]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from butterfly import timed  # noqa: E402  (bench/butterfly.py: seconds per call, best within a budget)
from models.flows import linear  # noqa: E402
from service.runners import TorchRunner, check_batch_invariance  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.tasks import dequantization_noise  # noqa: E402

BATCHES = (1, 16, 64, 256)


def rows_differing(runner: TorchRunner, x: np.ndarray, noise: np.ndarray | None) -> int:
    """Of 40 probe rows scored one by one, how many differ (bit for bit) inside larger batches."""
    def score(a: int, b: int) -> np.ndarray:
        return runner.log_prob(x[a:b], None if noise is None else noise[a:b])

    alone = np.concatenate([score(i, i + 1) for i in range(40)])
    bad = np.zeros(40, bool)
    for size in (2, 3, 8, 17, 64, 65, 256):
        k = min(size, 40)
        bad[:k] |= score(0, size)[:k] != alone[:k]
    bad[20:] |= score(20, 280)[:20] != alone[20:]
    return int(bad.sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="digits,digits-flowpp,mimic-vitals,mimic-waveform")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default_sum_channels = linear.SUM_MAX_CHANNELS
    print(f"torch {torch.__version__}, {args.threads} thread(s); rows/s per batch size; 'differ': of 40 probe rows, how many "
          "change with their batch-mates")
    for name in args.models.split(","):
        path = ROOT / "model_repository" / name / "1"
        variants = {"eager": Settings(trace_cpu=False, batch_invariant=False), "eager, tiles": Settings(trace_cpu=False),
                    "traced": Settings(), "traced, 1x1 conv": Settings()}
        rates: dict[str, list[float]] = {}
        print(f"{name}:")
        for label, settings in variants.items():
            linear.SUM_MAX_CHANNELS = 0 if label == "traced, 1x1 conv" else default_sum_channels
            try:
                t0 = time.perf_counter()
                runner = TorchRunner(path, "cpu", settings)
                check_batch_invariance(runner, settings)
                load_s = time.perf_counter() - t0
                m = runner.manifest
                x = m.data_spec.random_examples(280, seed=3).astype(np.float32)
                noise = dequantization_noise(m, 280, 3)
                rates[label] = [b / timed(lambda b=b: runner.log_prob(x[:b], None if noise is None else noise[:b]), args.seconds)
                                for b in BATCHES]
                differ = rows_differing(runner, x, noise)
            finally:
                linear.SUM_MAX_CHANNELS = default_sum_channels
            cells = "  ".join(f"b{b} {r:8.0f}" for b, r in zip(BATCHES, rates[label]))
            print(f"  {label:16s} {cells}  differ {differ:2d}/40  load {load_s:4.1f} s  ({runner.execution['score']})", flush=True)
        for other in ("eager, tiles", "eager", "traced, 1x1 conv"):
            ratio = "  ".join(f"b{b} {t / e:5.2f}x" for b, t, e in zip(BATCHES, rates["traced"], rates[other]))
            print(f"  traced / {other + ':':17s} {ratio}")


if __name__ == "__main__":
    main()
