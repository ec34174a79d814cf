"""The training step: the on-device guard against non-finite losses, the precision policy, torch.compile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models.training.loop as training
from models import load
from models.architectures import build, parse_config
from models.data import load_dataset
from models.flows import data_init
from models.precision import set_precision
from models.training.loop import TrainConfig, TrainingError, train
from tests.conftest import TINY_GLOW


def poisoned(bad_steps: set[int] | None):  # noqa: ANN201
    """A ``batch_source`` whose batches are all NaN at ``bad_steps`` (every step when ``None``)."""
    real = training.batch_source

    def source(train_x: np.ndarray, device: torch.device):  # noqa: ANN202
        batches, step = real(train_x, device), iter(range(10**9))

        def get(idx: np.ndarray) -> torch.Tensor:
            x = batches(idx)
            return torch.full(x.shape, float("nan")) if bad_steps is None or next(step) in bad_steps else x

        return get

    return source


def test_non_finite_steps_are_skipped_on_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "batch_source", poisoned({3, 4, 5}))
    cfg = TrainConfig.model_validate({**TINY_GLOW, "train": {**TINY_GLOW["train"], "steps": 20, "eval_every": 20}})
    m = train(cfg, tmp_path / "run", progress=False)
    assert m["skipped_steps"] == 3 and np.isfinite(m["test_bits_per_dim"])
    assert all(torch.isfinite(p).all() for p in load(str(tmp_path / "run" / "artifact")).parameters())


def test_a_loss_that_stays_non_finite_stops_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training, "batch_source", poisoned(None))
    cfg = TrainConfig.model_validate({**TINY_GLOW, "train": {**TINY_GLOW["train"], "steps": 40, "max_nonfinite": 5}})
    with pytest.raises(TrainingError, match="non-finite for 11 steps in a row at step 10"):  # read every 10 steps
        train(cfg, tmp_path / "run", progress=False)


def test_bf16_runs_conditioners_only_and_trains(tmp_path: Path) -> None:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build(parse_config(TINY_GLOW["model"]), data.spec)
    x = torch.from_numpy(data.split("train")[:32])
    with data_init(model), torch.no_grad():
        model.log_prob(x)
    for p in model.parameters():  # away from the zero-initialised outputs, so the conditioners matter
        p.data.add_(0.05 * torch.randn_like(p))
    dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
    fp32 = model.log_prob(x)
    assert set_precision(model, "bf16") > 0
    bf16 = model.log_prob(x)
    assert torch.bfloat16 in dtypes and torch.float32 in dtypes  # conditioner convolutions, and the 1×1 bijector ones
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().mean()
    m = train(TrainConfig.model_validate({**TINY_GLOW, "precision": "bf16"}), tmp_path / "run", progress=False)
    assert np.isfinite(m["test_bits_per_dim"])
    assert load(str(tmp_path / "run" / "artifact")).state_dict().keys() == model.state_dict().keys()  # artifacts unchanged


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    """``compile: true`` trains the same model (about a minute of compilation on 2 CPU cores: ``make test-all``)."""
    steps = {**TINY_GLOW["train"], "steps": 10, "eval_every": 10}
    eager = train(TrainConfig.model_validate({**TINY_GLOW, "train": steps}), tmp_path / "eager", progress=False)
    compiled = train(TrainConfig.model_validate({**TINY_GLOW, "compile": True, "train": steps}), tmp_path / "compiled", progress=False)
    assert compiled["test_bits_per_dim"] == pytest.approx(eager["test_bits_per_dim"], rel=1e-3)


def test_micro_batches_accumulate_the_whole_batch_gradient(tmp_path: Path) -> None:
    steps = {**TINY_GLOW["train"], "steps": 6, "eval_every": 6}
    whole = train(TrainConfig.model_validate({**TINY_GLOW, "train": steps}), tmp_path / "whole", progress=False)
    micro = train(TrainConfig.model_validate({**TINY_GLOW, "train": {**steps, "micro_batch": 8}}), tmp_path / "micro", progress=False)
    assert whole["micro_batch"] == 32 and micro["micro_batch"] == 8
    a, b = (load(str(tmp_path / run / "artifact")).state_dict() for run in ("whole", "micro"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def fake_growth(per_row_bytes: int):  # noqa: ANN201
    """``models.training.memory.peak_growth`` that reports ``per_row_bytes`` for each row of the probe step."""
    import contextlib

    @contextlib.contextmanager
    def growth(device: torch.device):  # noqa: ANN202
        yield lambda: per_row_bytes * training.PROBE_ROWS

    return growth


def test_a_step_that_cannot_fit_stops_with_what_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training.memory

    monkeypatch.setattr(models.training.memory, "peak_growth", fake_growth(models.training.memory.GB))
    cfg = TrainConfig.model_validate({**TINY_GLOW, "train": {**TINY_GLOW["train"], "memory_gb": 0.5}})
    with pytest.raises(TrainingError, match=r"needs about 1.00 GB per example and only [\d.]+ GB are allowed \(train.memory_gb\)"):
        train(cfg, tmp_path / "run", progress=False)


def test_memory_budget_picks_micro_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import models.training.memory

    monkeypatch.setattr(models.training.memory, "peak_growth", fake_growth(10 << 20))  # 10 MiB per row
    held = models.training.memory.in_use_bytes(torch.device("cpu")) / models.training.memory.GB
    cfg = TrainConfig.model_validate({**TINY_GLOW, "train": {**TINY_GLOW["train"], "steps": 2, "memory_gb": held + 0.2}})
    assert 2 <= train(cfg, tmp_path / "run", progress=False)["micro_batch"] < 32  # about 0.2 GB over what it holds


def test_the_memory_probe_measures_a_step() -> None:
    from models.training.memory import peak_growth

    with peak_growth(torch.device("cpu")) as grown:
        block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB touched
        del block
    if grown() is None:
        pytest.skip("this kernel does not let a process reset its peak resident memory (/proc/self/clear_refs)")
    assert grown() >= 60 << 20


@pytest.mark.slow
def test_compiled_runner_scores_as_eager() -> None:
    """``FLOWSERVE_COMPILE=1``: the runner's scoring goes through torch.compile and gives eager's numbers."""
    from service.core.tasks import dequantization_noise
    from service.executor.runners import TorchRunner
    from service.settings import Settings

    path = Path(__file__).resolve().parent.parent / "model_repository" / "digits" / "1"
    compiled = TorchRunner(path, "cpu", Settings(compile=True))
    eager = TorchRunner(path, "cpu", Settings())
    assert compiled.execution["score"].endswith("compiled")
    x = compiled.manifest.data_spec.random_examples(70, seed=1).astype(np.float32)
    noise = dequantization_noise(compiled.manifest, 70, 1)
    np.testing.assert_allclose(compiled.log_prob(x, noise), eager.log_prob(x, noise), rtol=1e-5, atol=1e-4)
