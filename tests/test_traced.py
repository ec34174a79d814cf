"""Torch scoring on the CPU through traced TorchScript graphs (``service.executor.traced``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from torch import Tensor

from models.artifacts.store import load
from models.flows.base import Bijector, Sequential
from service.core.tasks import dequantization_noise
from service.executor.compute import check_batch_invariance
from service.executor.runners import TorchRunner
from service.executor.traced import TraceMismatch, trace_score
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def rows_alone_and_batched(runner: TorchRunner, n: int = 150) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """12 probe rows scored one by one, and the same rows at various positions in batches of several sizes."""
    m = runner.manifest
    x = m.data_spec.random_examples(n, seed=5).astype(np.float32)
    noise = dequantization_noise(m, n, 5)

    def score(idx: np.ndarray) -> np.ndarray:
        return runner.log_prob(x[idx], None if noise is None else noise[idx])

    alone = np.concatenate([score(np.array([i])) for i in range(12)])
    batched = {}
    for size, at in ((2, 0), (12, 0), (17, 5), (64, 40), (n, n - 12), (n, 60)):
        idx = np.r_[np.arange(12, 12 + at), np.arange(12), np.arange(12 + at, size)]
        batched[size * 1000 + at] = score(idx)[at : at + 12]
    return alone, batched


def test_traced_convolutional_model_is_batch_invariant_without_tiles(tiny_glow_run: Path) -> None:
    """The Glow's convolutions all go to oneDNN in the traced graph: no tiles needed, and eager's numbers."""
    settings = Settings()
    runner = TorchRunner(tiny_glow_run / "artifact", "cpu", settings)
    check_batch_invariance(runner, settings)
    assert runner.execution["score"] == "torchscript (traced, oneDNN)" and runner.tiles["score"] is None
    alone, batched = rows_alone_and_batched(runner)
    for key, got in batched.items():
        np.testing.assert_array_equal(got, alone, err_msg=f"batch of {key // 1000} at {key % 1000}")

    eager = TorchRunner(tiny_glow_run / "artifact", "cpu", Settings(trace_cpu=False, batch_invariant=False))
    assert eager.execution["score"] == "eager"
    x = runner.manifest.data_spec.random_examples(40, seed=2).astype(np.float32)
    noise = dequantization_noise(runner.manifest, 40, 2)
    np.testing.assert_allclose(runner.log_prob(x, noise), eager.log_prob(x, noise), rtol=1e-5, atol=1e-3)
    assert runner.execution["sample"] == "eager, tiles of 64 rows"  # sampling is not traced


def test_traced_fully_connected_model_falls_back_to_tiles() -> None:
    """MKL's GEMM rounds by batch size: the load check finds that and tiles scoring; rows then agree."""
    settings = Settings()
    runner = TorchRunner(ROOT / "model_repository" / "mimic-vitals" / "1", "cpu", settings)
    assert runner.tiles["score"] is None
    check_batch_invariance(runner, settings)
    assert runner.execution["score"] == "torchscript (traced, oneDNN), tiles of 64 rows"
    alone, batched = rows_alone_and_batched(runner)
    for got in batched.values():
        np.testing.assert_array_equal(got, alone)


class BatchSizeBranch(Bijector):
    """Adds 1 nat to the log-density for batches over 4 rows, −1 otherwise: Python control flow a trace cannot keep."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x.new_full((x.shape[0],), 1.0 if x.shape[0] > 4 else -1.0)


def test_a_trace_that_disagrees_with_eager_is_not_used(tiny_glow_run: Path) -> None:
    model = load(tiny_glow_run / "artifact", "cpu")
    model.flow = Sequential([BatchSizeBranch(), model.flow])
    with pytest.raises(TraceMismatch, match="differs from eager at 1 rows"):
        trace_score(model, rows=8)


def test_runner_serves_eager_and_says_why_when_tracing_fails(tiny_glow_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.executor.runners

    original = service.executor.runners.load

    def load_with_branch(path: Path, device: str):  # noqa: ANN202
        model = original(path, device)
        model.flow = Sequential([BatchSizeBranch(), model.flow])
        return model

    monkeypatch.setattr(service.executor.runners, "load", load_with_branch)
    runner = TorchRunner(tiny_glow_run / "artifact", "cpu", Settings())
    [fallback] = runner.fallbacks
    assert fallback.describe().startswith("torchscript off: mismatch, traced log_prob differs from eager at 1 rows")
    assert runner.execution["score"] == f"eager, tiles of 64 rows ({fallback.describe()})"
    assert runner.tiles["score"] == 64 and [(f.task, f.path, f.reason) for f in runner.fallbacks] == [("score", "torchscript", "mismatch")]


def test_traced_runner_draws_noise_when_a_caller_gives_none() -> None:
    """Traced (and, on CUDA, captured) graphs take dequantization noise as an input; a caller with no noise
    (direct runner use; the service always sends seeded noise) is scored eagerly with noise drawn there, not
    refused: the bundled Flow++ (variational dequantization)."""
    runner = TorchRunner(ROOT / "model_repository" / "digits-flowpp" / "1", "cpu", Settings())
    assert runner.execution["score"].startswith("torchscript")
    m = runner.manifest
    x = m.data_spec.random_examples(20, seed=3).astype(np.float32)
    drawn = runner.log_prob(x, None)
    seeded = runner.log_prob(x, dequantization_noise(m, 20, 3))
    assert drawn.shape == seeded.shape == (20,) and np.isfinite(drawn).all()
    assert abs(drawn.mean() - seeded.mean()) < 0.02 * abs(seeded.mean())  # the same bound, other noise
