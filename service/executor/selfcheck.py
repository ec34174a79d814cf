"""Self-checks at load: every optimised path of a model is compared with its reference on probe rows
before it serves, and a path that fails is switched off for that model and task.

The optimised paths and their references (:class:`service.executor.runners.TorchRunner`):

| path | reference | checked at |
| --- | --- | --- |
| the fused Triton butterfly kernel (CUDA) | the same model with the PyTorch butterfly levels | score and sample, 3 batch sizes |
| ``torch.compile`` (``FLOWSERVE_COMPILE``) | the uncompiled model | score, 3 batch sizes |
| CUDA graphs | eager on the same device | every captured batch size |
| the traced TorchScript graph (CPU) | eager | score, 3 batch sizes |
| ONNX Runtime on CUDA | the artifact's torch model on the CPU | score, 3 batch sizes |

A path fails its check when its result is outside tolerance (``|fast − reference| ≤ ATOL + RTOL·|reference|``
nats for scores; data units for samples), or when building or running it raises. A CUDA error that can
poison the device context (an illegal address, a device-side assert) is a ``device_fault``: the executor
exits for the supervisor to restart it, and the path stays off after the restart
(:class:`Quarantine`). The model then serves on the reference path; ``execution`` in
``GET /v1/models/{name}`` says why, ``flowserve_fallbacks_total{model,task,reason}`` counts it, and the
log says it once. Requests are never answered from a path that failed, since the checks run before
the model is ready.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np

log = logging.getLogger("flowserve.selfcheck")

Reason = Literal["mismatch", "error", "device_fault"]
REASONS: tuple[Reason, ...] = ("mismatch", "error", "device_fault")  # the counter's bounded ``reason`` label
RTOL, ATOL = 1e-4, 1e-3  # float32 arithmetic in another order (fused kernels, graphs, TF32 off)
PROBE_ROWS = (1, 7, 64)
_FATAL = re.compile(r"CUDA (error|failure)|illegal memory access|illegal address|device-side assert|unspecified launch failure|"
                    r"ECC error", re.I)


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error after which the device context cannot be trusted (out-of-memory is not one)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and bool(_FATAL.search(text)) and "out of memory" not in text.lower()


@dataclass(frozen=True)
class Fallback:
    """A path switched off for one model and task."""

    task: str
    path: str  # "triton butterfly", "torch.compile", "cuda graphs", "torchscript", "onnxruntime cuda"
    reason: Reason
    detail: str

    def describe(self) -> str:
        return f"{self.path} off: {self.reason}, {self.detail}"


class DeviceFault(RuntimeError):
    """A check hit a CUDA error that poisons the context: the process must restart without the path."""

    def __init__(self, fallback: Fallback) -> None:
        super().__init__(fallback.describe())
        self.fallback = fallback


def disagreement(got: np.ndarray, want: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> str | None:
    """``None`` when ``got`` matches ``want`` within tolerance, else what differs."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return f"shape {got.shape} instead of {want.shape}"
    bad = ~np.isclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    gap = np.abs(got - want)
    worst = float(np.nanmax(np.where(bad, gap, 0))) if np.isfinite(gap[bad]).any() else float("nan")
    return f"{int(bad.sum())} of {bad.size} values differ from the reference (max |Δ| {worst:.3g})"


def check(task: str, path: str, fast: Callable[[int], np.ndarray], reference: Callable[[int], np.ndarray],
          sizes: tuple[int, ...] = PROBE_ROWS) -> Fallback | None:
    """Compare ``fast(n)`` with ``reference(n)`` for each probe size ``n``; the :class:`Fallback` when they disagree or
    ``fast`` raises (a device fault raises :class:`DeviceFault`), else ``None``."""
    for n in sizes:
        want = reference(n)
        try:
            got = fast(n)
        except Exception as e:  # noqa: BLE001 - any failure of the optimised path sends the model to its reference
            first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            if is_device_fault(e):
                raise DeviceFault(Fallback(task, path, "device_fault", first)) from e
            return Fallback(task, path, "error", f"{type(e).__name__}: {first} at {n} rows")
        why = disagreement(got, want)
        if why is not None:
            return Fallback(task, path, "mismatch", f"{why} at {n} rows")
    return None


def failed(task: str, path: str, exc: BaseException) -> Fallback:
    """The :class:`Fallback` for a path that could not be built (raises :class:`DeviceFault` for a device fault)."""
    first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    if is_device_fault(exc):
        raise DeviceFault(Fallback(task, path, "device_fault", first)) from exc
    return Fallback(task, path, "error", f"{type(exc).__name__}: {first}")


class Quarantine:
    """Paths that hit a device fault, per artifact, remembered across executor restarts (a JSON file in the
    server's run directory): a restarted executor loads the model without them."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def _read(self) -> dict[str, list[dict]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def of(self, artifact: Path) -> list[Fallback]:
        return [Fallback(**f) for f in self._read().get(str(artifact), [])]

    def add(self, artifact: Path, fallback: Fallback) -> None:
        if self.path is None:
            return
        known = self._read()
        known.setdefault(str(artifact), []).append(asdict(fallback))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known))
        tmp.replace(self.path)
