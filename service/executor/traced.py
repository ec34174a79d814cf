"""A torch model's scoring forward on the CPU as a TorchScript graph, traced and optimised at load.

Eager PyTorch on the CPU spends a small batch dispatching ops from Python (the bundled digits
Glow: about 1,000 ops per forward, 9 ms for one row, under 3 ms as a frozen graph) and picks the
convolution algorithm by batch size (profiled: ATen's own im2col kernel for a single row, oneDNN
for 64), so a row rounds differently with different batch-mates. The graph traced here is frozen and passed through
``torch.jit.optimize_for_inference``: it runs without Python between ops, and every convolution
goes to oneDNN with prepacked weights at every batch size. Measured on the bundled digits Glow
(one thread): rows are bit-for-bit independent of their batch-mates without tiles, and scoring
is 1.5–3.7× faster than eager with tiles (``bench/traced.py``). Fully connected layers
still go to MKL's GEMM, whose rounding depends on the number of rows: such models keep tiles
(:func:`service.executor.compute.check_batch_invariance` finds out at load) and still gain the dispatch.

``torch.jit.trace`` is deprecated in favour of ``torch.compile`` and ``torch.export`` (and already
underlies the ONNX export, :mod:`models.artifacts.export`). Inductor, tried on the same model with a dynamic
batch, compiled for 134 s and recompiled for 180 s more on 2 cores, and its result was neither
faster at one row nor batch-invariant. A trace records one path through the model's Python, so
the graph is compared with eager on fresh rows at several batch sizes before it is used; a
model that cannot be traced, or whose trace disagrees, is served eager and says why.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from models.density import DensityModel

# |traced − eager| ≤ ATOL + RTOL·|eager| (nats): float32 rounding of a different summation order.
RTOL, ATOL = 1e-5, 1e-3
CHECK_ROWS = (1, 5, 67)


class TraceMismatch(RuntimeError):
    """The traced graph's log-probabilities differ from eager's beyond rounding."""


class _Score(nn.Module):
    """``(x, [noise]) -> log_prob (B,)`` float64 nats: the forward that gets traced."""

    def __init__(self, model: DensityModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *noise: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x, noise[0] if noise else None).double()


def _inputs(model: DensityModel, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    x = torch.from_numpy(model.spec.random_examples(n, seed).astype(np.float32))
    if model.dequantizer is None:
        return (x,)
    return x, model.noise(n, torch.Generator().manual_seed(seed))


def trace_score(model: DensityModel, rows: int = 8) -> torch.jit.ScriptModule:
    """The model's CPU scoring as an optimised TorchScript graph: ``graph(x[, noise]) -> (B,)`` float64 nats.

    ``noise`` is an argument exactly when the model has a dequantizer. Raises whatever tracing
    raises, or :class:`TraceMismatch` when the graph and eager disagree on probe rows.
    """
    module = _Score(model).eval()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # Python values read from tensors: checked below
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace (see the module docstring)
        graph = torch.jit.trace(module, _inputs(model, rows, 0), check_trace=False)
        graph = torch.jit.optimize_for_inference(torch.jit.freeze(graph.eval()))
        for i, n in enumerate(CHECK_ROWS):
            args = _inputs(model, n, i + 1)
            want, got = module(*args).numpy(), graph(*args).numpy()
            if got.shape != want.shape or not np.allclose(got, want, rtol=RTOL, atol=ATOL, equal_nan=True):
                worst = float(np.max(np.abs(got - want))) if got.shape == want.shape else float("nan")
                raise TraceMismatch(f"traced log_prob differs from eager at {n} rows (max |Δ| {worst:.3g} nats)")
    return graph
