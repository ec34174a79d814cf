"""The tabular flow and its preset: it starts as its Gaussian, keeps it when couplings do not help, beats it when they do,
and reads real CSVs (integer, constant, skewed columns) through ``flowserve train --preset tabular``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models import presets
from models.architectures import TabularFlowConfig, build, sized_for
from models.artifacts import store as artifact
from models.data import load_dataset
from models.density import DensityModel
from models.flows import GaussianWhitening, Sequential, data_init
from models.flows.normalization import cv_shrinkage, gaussian_log_likelihood, shrunk_covariance
from models.spec import DataSpec
from models.training.loop import load_config, train

ROOT = Path(__file__).resolve().parent.parent


def write_csv(path: Path, names: list[str], rows: np.ndarray) -> str:
    path.write_text(",".join(names) + "\n" + "\n".join(",".join(f"{v:.10g}" for v in r) for r in rows) + "\n")
    return f"csv:{path}"


def its_gaussian(model: DensityModel) -> DensityModel:
    """The flow's initial model: the marginal and whitening layers alone."""
    return DensityModel(Sequential(list(model.flow.layers[:2])), model.spec).eval()


def quick(cfg, data: str, seed: int = 0):  # noqa: ANN001, ANN201 - the preset with a short budget for tests
    return cfg.model_copy(update={"data": data, "seed": seed, "train": cfg.train.model_copy(update={"steps": 600})})


def test_sizes_follow_the_data_and_explicit_sizes_stay() -> None:
    cfg = TabularFlowConfig()
    small, large = cfg.sized_for(40, 30), cfg.sized_for(20_000, 30)
    assert (small.steps, small.hidden) == (2, 4) and (large.steps, large.hidden) == (6, 128)
    mid = cfg.sized_for(1000, 10)
    assert mid.steps == 4 and mid.hidden == int(0.25 * 1000 * 10 / (1.5 * 10 * 4))
    assert TabularFlowConfig(steps=3, hidden=7).sized_for(10_000, 5).model_dump() == TabularFlowConfig(steps=3, hidden=7).model_dump()
    assert sized_for(cfg, 100, 3).steps == 2


def test_tabular_flow_starts_as_its_gaussian_copula() -> None:
    """Before training, the couplings are the identity: log p of the whole flow is that of its first two layers."""
    rng = np.random.default_rng(0)
    x = np.c_[np.exp(rng.standard_normal(300)), rng.standard_normal(300) * 50 + 1000, rng.gamma(2.0, size=300)]
    spec = DataSpec(kind="record", shape=(3,), feature_names=["a", "b", "c"])
    model = build(TabularFlowConfig().sized_for(300, 3), spec).double()
    xt = torch.from_numpy(x)
    with data_init(model), torch.no_grad():
        model.log_prob(xt)
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(xt), its_gaussian(model).log_prob(xt), rtol=0, atol=1e-10)
        assert sum(p.numel() for p in model.parameters()) > 0  # the couplings are there, at the identity


def test_cv_shrinkage_takes_the_held_out_best_intensity() -> None:
    """The chosen intensity is the grid's held-out likelihood maximum; with fewer records than features it
    still gives a positive-definite covariance; with none to spare it is the largest intensity."""
    rng = np.random.default_rng(1)
    cov = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    x = rng.multivariate_normal(np.zeros(3), cov, 400)
    grid = GaussianWhitening.SHRINKAGE_GRID
    chosen = cv_shrinkage(x, grid, 5)
    fold = np.arange(len(x)) % 5
    held = {a: sum(gaussian_log_likelihood(x[fold == f], x[fold != f].mean(0), shrunk_covariance(x[fold != f], a)) for f in range(5))
            for a in grid}
    assert chosen == max(held, key=held.get) and chosen < 0.1  # strongly correlated, many records: little shrinkage
    wide = rng.standard_normal((12, 30))
    assert np.all(np.linalg.eigvalsh(shrunk_covariance(wide, cv_shrinkage(wide, grid, 5))) > 0)
    assert cv_shrinkage(wide[:6], grid, 5) == max(grid)


def test_csv_columns_integer_constant_and_scaled(tmp_path: Path) -> None:
    """Integer-valued columns are declared discrete (dequantized); a constant column and columns 10⁶ apart in scale train to
    finite scores, and a value off the constant scores far out."""
    rng = np.random.default_rng(2)
    n = 300
    rows = np.c_[rng.poisson(4, n), np.full(n, 3.5), rng.standard_normal(n) * 1e4 + 5e4, np.exp(rng.standard_normal(n)) * 1e-3]
    data = write_csv(tmp_path / "r.csv", ["count", "constant", "big", "tiny"], rows)
    assert load_dataset(data).spec.discrete_features == [0]
    cfg = quick(load_config(presets.path("tabular")), data)
    metrics = train(cfg, tmp_path / "run", progress=False)
    model = artifact.load(tmp_path / "run" / "artifact")
    assert model.spec.discrete_features == [0] and math.isfinite(metrics["test_nll_nats"])
    from models.anomaly.scoring import model_scorer

    score = model_scorer(model)
    ok = score(rows[:5].astype(np.float32), None)
    off = rows[:5].copy()
    off[:, 1] = 3.6
    assert np.isfinite(ok).all() and (score(off.astype(np.float32), None) < ok - 1000).all()


def test_training_keeps_the_gaussian_when_couplings_do_not_help(tmp_path: Path) -> None:
    """On a few dozen Gaussian records the couplings cannot beat the Gaussian on held-out likelihood: the artifact holds
    the Gaussian, says so, and scores exactly as it does."""
    rng = np.random.default_rng(3)
    rows = rng.multivariate_normal(np.zeros(6), np.eye(6) + 0.5, 40)
    cfg = quick(load_config(presets.path("tabular")), write_csv(tmp_path / "g.csv", [f"f{i}" for i in range(6)], rows))
    metrics = train(cfg, tmp_path / "run", progress=False)
    manifest = artifact.read_manifest(tmp_path / "run" / "artifact")
    assert metrics["selected"] == manifest.metrics["selected"] == "gaussian" and metrics["best_step"] == 0
    assert metrics["val_bits_per_dim"] == pytest.approx(metrics["initial_val_bits_per_dim"], rel=1e-6)
    model = artifact.load(tmp_path / "run" / "artifact")
    x = torch.from_numpy(rows[:10].astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(model.log_prob(x), its_gaussian(model).log_prob(x), rtol=0, atol=1e-5)


def test_training_keeps_couplings_that_beat_the_gaussian(tmp_path: Path) -> None:
    """Where the structure is not Gaussian (a parabola), the couplings win on validation and on fresh records."""
    rng = np.random.default_rng(4)

    def draw(n: int) -> np.ndarray:
        a = rng.standard_normal(n)
        return np.c_[a, a**2 + 0.1 * rng.standard_normal(n), rng.standard_normal(n)]

    cfg = quick(load_config(presets.path("tabular")), write_csv(tmp_path / "p.csv", ["a", "b", "c"], draw(1500)))
    metrics = train(cfg, tmp_path / "run", progress=False)
    assert metrics["selected"] == "flow" and metrics["val_bits_per_dim"] < metrics["initial_val_bits_per_dim"]
    model = artifact.load(tmp_path / "run" / "artifact")
    fresh = torch.from_numpy(draw(500).astype(np.float32))
    with torch.no_grad():
        gain = (model.log_prob(fresh) - its_gaussian(model).log_prob(fresh)).mean()
    assert gain > 0.5  # nats per record


def test_preset_from_the_command_line(tmp_path: Path) -> None:
    """``flowserve train --preset tabular --data csv:FILE`` as a user runs it, then ``flowserve calibrate``; a wrong preset
    or a missing config is one clear line and status 2."""
    rows = np.random.default_rng(5).standard_normal((120, 4)) * [1, 10, 100, 1000]
    data = write_csv(tmp_path / "mine.csv", ["a", "b", "c", "d"], rows)
    run = subprocess.run([sys.executable, "-m", "models.cli", "train", "--preset", "tabular", "--data", data, "--out", str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    metrics = json.loads(run.stdout[: run.stdout.rindex("}") + 1])
    assert metrics["selected"] in ("gaussian", "flow") and metrics["data"] == data
    trained = artifact.read_manifest(tmp_path / "run" / "artifact").calibration
    assert trained.n == metrics["calibration_records"] == 50  # a quarter of the records, at least 50
    calibrate = [sys.executable, "-m", "models.cli", "calibrate", str(tmp_path / "run" / "artifact")]
    again = subprocess.run([*calibrate, "--data", data], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert again.returncode == 0 and "calibrated on 50 records" in again.stdout, again.stderr
    assert artifact.read_manifest(tmp_path / "run" / "artifact").calibration.scores == trained.scores  # the same records
    other = write_csv(tmp_path / "normal.csv", ["a", "b", "c", "d"], np.random.default_rng(6).standard_normal((120, 4)) * [1, 10, 100, 1000])
    cal = subprocess.run([*calibrate, "--data", other], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cal.returncode == 0 and "calibrated on 120 records" in cal.stdout, cal.stderr
    for args, message in ((["--preset", "nope", "--data", data], "no preset 'nope'; presets: tabular"),
                          (["--data", data], "give a config file or --preset NAME")):
        bad = subprocess.run([sys.executable, "-m", "models.cli", "train", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
