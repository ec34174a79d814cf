"""Torch scoring on the CPU: eager vs the traced graph (``service.executor.traced``), as the service runs them.

For each bundled model (torch backend, one thread unless ``--threads``), side by side in one run:

* ``eager``: the model in eager PyTorch, no tiles (what ``FLOWSERVE_BATCH_INVARIANT=0
  FLOWSERVE_TRACE_CPU=0`` serves);
* ``eager, tiles``: eager in tiles of 64 rows (the default before the traced graph);
* ``traced``: the default: the traced graph, with tiles only where the load check asks for them;
* ``traced, 1x1 conv``: the same, with channel mixing as oneDNN 1×1 convolutions at every channel
  count (``models.flows.linear.SUM_MAX_CHANNELS = 0``), as before the multiply-sum for few channels;

rows/s at batch 1, 16, 64 and 256 (each the best call within ``--seconds``; every variant and batch
size measured in turn, ``--repeats`` rounds, medians), the ratios of traced to the others (medians
of the per-round ratios), and how many of 40 probe rows change in the last bits with their
batch-mates (batches of 2–256, shifted positions).
Usage: ``python bench/traced.py [--seconds 0.3] [--repeats 5] [--threads 1] [--models digits,mimic-vitals]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from butterfly import timed  # noqa: E402  (bench/butterfly.py: seconds per call, best within a budget)

from models.flows import linear  # noqa: E402
from service.core.tasks import dequantization_noise  # noqa: E402
from service.executor.compute import check_batch_invariance  # noqa: E402
from service.executor.runners import TorchRunner
from service.settings import Settings  # noqa: E402

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


@contextlib.contextmanager
def channel_mixing(label: str, default: int) -> Iterator[None]:
    """The ``traced, 1x1 conv`` variant traces and runs with ``SUM_MAX_CHANNELS = 0``; the others with the default."""
    linear.SUM_MAX_CHANNELS = 0 if label == "traced, 1x1 conv" else default
    try:
        yield
    finally:
        linear.SUM_MAX_CHANNELS = default


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=0.3, help="per measurement (the best call within it)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of every variant and batch size, interleaved")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="digits,digits-flowpp,mimic-vitals,mimic-waveform")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default = linear.SUM_MAX_CHANNELS
    print(f"torch {torch.__version__}, {args.threads} thread(s); rows/s per batch size (median of {args.repeats} interleaved "
          "rounds); 'differ': of 40 probe rows, how many change with their batch-mates")
    for name in args.models.split(","):
        path = ROOT / "model_repository" / name / "1"
        variants = {"eager": Settings(trace_cpu=False, batch_invariant=False), "eager, tiles": Settings(trace_cpu=False),
                    "traced": Settings(), "traced, 1x1 conv": Settings()}
        runners: dict[str, TorchRunner] = {}
        load_s: dict[str, float] = {}
        for label, settings in variants.items():
            with channel_mixing(label, default):
                t0 = time.perf_counter()
                runners[label] = TorchRunner(path, "cpu", settings)
                check_batch_invariance(runners[label], settings)
                load_s[label] = time.perf_counter() - t0
        m = runners["traced"].manifest
        x = m.data_spec.random_examples(280, seed=3).astype(np.float32)
        noise = dequantization_noise(m, 280, 3)
        rates = {label: {b: [] for b in BATCHES} for label in runners}
        for _ in range(args.repeats):  # interleaved: the machine's drift hits every variant alike
            for b in BATCHES:
                for label, runner in runners.items():
                    with channel_mixing(label, default):
                        call = lambda r=runner, b=b: r.log_prob(x[:b], None if noise is None else noise[:b])  # noqa: E731
                        rates[label][b].append(b / timed(call, args.seconds))
        print(f"{name}:")
        for label, runner in runners.items():
            with channel_mixing(label, default):
                differ = rows_differing(runner, x, noise)
            cells = "  ".join(f"b{b} {np.median(rates[label][b]):8.0f}" for b in BATCHES)
            print(f"  {label:16s} {cells}  differ {differ:2d}/40  load {load_s[label]:4.1f} s  ({runner.execution['score']})",
                  flush=True)
        for other in ("eager, tiles", "eager", "traced, 1x1 conv"):
            ratio = "  ".join(f"b{b} {np.median(np.divide(rates['traced'][b], rates[other][b])):5.2f}x" for b in BATCHES)
            print(f"  traced / {other + ':':17s} {ratio}")


if __name__ == "__main__":
    main()
