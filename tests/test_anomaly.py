"""Calibrated anomaly scores: conformal math, training-time calibration, the service route."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from models import load
from models.anomaly.scoring import AnomalyScorer, atom_design, find_atoms
from models.artifacts.manifest import Calibration
from models.training.loop import TrainConfig, train
from tests.server import running_server

FEATURES = ["heart_rate", "systolic_bp", "diastolic_bp", "spo2"]
MEAN = np.array([80.0, 120.0, 75.0, 97.0])
COV = np.array([[100, 30, 20, -2], [30, 225, 90, 0], [20, 90, 100, 0], [-2, 0, 0, 2.0]])


def normal_records(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(MEAN, COV, n).astype(np.float32)


@pytest.fixture(scope="module")
def record_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("records")
    csv = tmp / "vitals.csv"
    data = normal_records(3000, 0)
    csv.write_text(",".join(FEATURES) + "\n" + "\n".join(",".join(f"{v:.3f}" for v in row) for row in data) + "\n")
    cfg = TrainConfig.model_validate({
        "data": f"csv:{csv}", "model": {"name": "vector", "steps": 4, "hidden": 32},
        "train": {"steps": 400, "batch_size": 128, "lr": 0.003, "ema": 0.95, "eval_every": 100, "init_batch": 512}, "seed": 0})
    train(cfg, tmp / "run", progress=False)
    return tmp / "run" / "artifact"


def test_conformal_p_values_and_threshold() -> None:
    scorer = AnomalyScorer(Calibration(scores=list(range(1, 100))))  # n = 99
    res = scorer.assess(np.array([0.0, 50.0, 99.0, 1000.0]), dims=1, target_fpr=0.05)
    assert [r.p_value for r in res] == [1.0, 0.51, 0.02, 0.01]
    assert [r.is_anomaly for r in res] == [False, False, True, True]
    assert scorer.threshold(0.05) == 95.0  # k = ceil(100 · 0.95) = 95th smallest
    assert res[1].percentile == pytest.approx(100 * 50 / 99)
    assert AnomalyScorer(Calibration(scores=[1.0, 2.0])).threshold(0.01) == float("inf")


def test_typicality_flags_both_tails() -> None:
    scorer = AnomalyScorer(Calibration(scores=list(range(1, 100)), mean=50.0))
    p = scorer.p_values(np.array([50.0, 1.0, 99.0, -200.0, 300.0]), "typicality")
    assert p[0] == 1.0 and p[3] == p[4] == 0.01  # too likely is as suspicious as too unlikely
    assert scorer.p_values(np.array([-200.0]), "nll")[0] == 1.0  # the one-sided NLL test misses it


def test_the_calibration_names_the_default_statistic() -> None:
    cal = Calibration(scores=list(range(1, 100)), mean=50.0)
    scorer = AnomalyScorer(cal.model_copy(update={"statistic": "typicality"}))
    assert scorer.resolve(None) == "typicality" and scorer.resolve("nll") == "nll"
    assert scorer.p_values(np.array([-200.0]))[0] == 0.01 and scorer.assess(np.array([-200.0]), 1)[0].statistic == "typicality"
    assert AnomalyScorer(cal).resolve(None) == "nll"  # calibrations written before the default was stored
    with pytest.raises(ValueError, match="unknown statistic"):
        scorer.resolve("likelihood")
    with pytest.raises(ValueError, match="needs a record model"):
        scorer.resolve("conditional")


def test_conditional_statistic_removes_the_point_mass_effect() -> None:
    """A record on a point mass (x_0 = 0.21) gets a spike in density; conditioning on the atom pattern undoes it."""
    rng = np.random.default_rng(0)
    n = 2000
    on_atom = rng.random(n) < 0.7
    x = np.c_[np.where(on_atom, 0.21, rng.uniform(0.3, 0.6, n)), rng.standard_normal(n)].astype(np.float32)
    nll = np.where(on_atom, -6.0, 1.0) + 0.5 * x[:, 1] ** 2  # the spike: 7 nats lower on the atom
    atoms = find_atoms(x)
    assert atoms == [(0, float(np.float32(0.21)))]
    design = atom_design(x, atoms)
    beta = np.linalg.lstsq(design, nll, rcond=None)[0]
    cal = Calibration(scores=sorted(nll), mean=float(nll.mean()), statistic="conditional", atoms=atoms,
                      atom_effects=beta.tolist(), conditional_scores=sorted(nll - design @ beta))
    scorer = AnomalyScorer(cal)
    odd = np.array([[0.45, 3.5], [0.21, 3.5]], dtype=np.float32)  # |x_1| = 3.5: anomalous whatever x_0 is
    odd_nll = np.array([1.0 + 0.5 * 3.5**2, -6.0 + 0.5 * 3.5**2])
    assert (scorer.p_values(odd_nll, x=odd) <= 0.01).all()
    assert scorer.p_values(odd_nll, "nll")[1] > 0.05  # the spike hides the one on the atom from the plain NLL
    with pytest.raises(ValueError, match="needs the records"):
        scorer.statistic(odd_nll)


def test_training_stores_calibration_and_fpr_holds(record_run: Path) -> None:
    import torch

    model = load(str(record_run))
    cal = model.manifest.calibration
    assert cal.method == "conformal" and cal.n == 150 and cal.scores == sorted(cal.scores)
    assert cal.statistic == "nll"
    scorer = AnomalyScorer(cal)
    fresh = normal_records(4000, 99)
    nll = -model.log_prob(torch.from_numpy(fresh)).detach().numpy()
    realised = np.mean([r.is_anomaly for r in scorer.assess(nll, 4, target_fpr=0.1)])
    assert abs(realised - 0.1) < 0.04  # finite-calibration-set spread at n = 150


def test_anomaly_route(record_run: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(record_run, repo / "vitals" / "1")
    normal = normal_records(20, 7)
    odd = normal[:3].copy()
    odd[:, 1] = [40.0, 260.0, 30.0]  # implausible systolic pressure
    with running_server(repo, tmp_path) as s, s.client() as c:
        desc = c.get("/v1/models/vitals").json()
        assert desc["data_spec"]["feature_names"] == FEATURES and desc["calibration"]["n"] == 150
        records = [dict(zip(FEATURES, map(float, r))) for r in np.concatenate([normal, odd])]
        r = c.post("/v1/models/vitals/anomaly", json={"records": records, "target_fpr": 0.05})
        assert r.status_code == 200, r.text
        assert r.json()["statistic"] == "nll"  # the model's default
        res = r.json()["results"]
        assert all(x["is_anomaly"] for x in res[-3:])
        assert sum(x["is_anomaly"] for x in res[:-3]) <= 4
        assert all(0 < x["p_value"] <= 1 for x in res) and res[-1]["nll"] > max(x["nll"] for x in res[:-3])
        # attribution for the flagged records: the planted systolic pressure ranks first
        for x in res[-3:]:
            assert x["attribution"][0]["feature"] == "systolic_bp" and x["attribution"][0]["nats"] > 0
        assert all("attribution" not in x for x in res[:-3] if not x["is_anomaly"])
        # absent or null features: the marginal of the observed ones, against calibration records of the same pattern;
        # only what was sent is blamed
        r = c.post("/v1/models/vitals/anomaly", json={"records": [{"heart_rate": 80, "spo2": None}], "explain": "all"})
        assert r.status_code == 200, r.text
        one = r.json()["results"][0]
        assert one["absent"] == ["systolic_bp", "diastolic_bp", "spo2"] and "imputed" not in one
        assert one["calibration_n"] == 150 and one["p_value_resolution"] == pytest.approx(1 / 151)
        assert [a["feature"] for a in one["attribution"]] == ["heart_rate"]
        assert r.json()["calibration"]["missing"] == "marginal" and r.json()["calibration"]["samples"] == 32
        # the median fill remains, named as such; it still blames only observed features
        r = c.post("/v1/models/vitals/anomaly", json={"records": [{"heart_rate": 80, "spo2": None}], "explain": "all",
                                                      "missing": "median"})
        one = r.json()["results"][0]
        assert one["imputed"] == ["systolic_bp", "diastolic_bp", "spo2"] and [a["feature"] for a in one["attribution"]] == ["heart_rate"]
        typ = c.post("/v1/models/vitals/anomaly", json={"records": records, "statistic": "typicality", "explain": "none"}).json()
        assert typ["statistic"] == "typicality" and all(x["is_anomaly"] for x in typ["results"][-3:])
        assert all("attribution" not in x for x in typ["results"])
        cond = c.post("/v1/models/vitals/anomaly", json={"records": records, "statistic": "conditional", "explain": "none"}).json()
        assert cond["statistic"] == "conditional" and all(x["is_anomaly"] for x in cond["results"][-3:])
        bad = c.post("/v1/models/vitals/anomaly", json={"records": records, "statistic": "likelihood"})
        assert bad.status_code == 400 and "statistic" in bad.json()["error"]
        unknown = c.post("/v1/models/vitals/anomaly", json={"records": [{**records[0], "lactate": 1}]})
        assert unknown.status_code == 400 and "unknown feature" in unknown.json()["error"]
        scored = c.post("/v1/models/vitals/score", json={"instances": records[:2]})
        assert scored.status_code == 200 and scored.json()["bound"] == "exact"
        # out of support: a 400 naming the record, never a 200 with null numbers
        for route, key in (("anomaly", "records"), ("score", "instances")):
            far = c.post(f"/v1/models/vitals/{route}", json={key: [records[0], {**records[1], "heart_rate": 1e30}]})
            assert far.status_code == 400 and f"{key}[1]: outside the model's support" in far.json()["error"], far.text
            huge = c.post(f"/v1/models/vitals/{route}", json={key: [{**records[0], "heart_rate": 1e308}]})
            assert huge.status_code == 400 and "beyond float32" in huge.json()["error"], huge.text


def test_anomaly_route_refuses_image_models(server) -> None:  # noqa: ANN001
    with server.client() as c:
        r = c.post("/v1/models/digits/anomaly", json={"records": [[0] * 64]})
    assert r.status_code == 400 and "no anomaly calibration" in r.json()["error"]


def test_conditional_statistic_is_refused_for_non_record_data_before_training(tmp_path: Path) -> None:
    from models.errors import ConfigError
    from models.training.loop import TrainConfig, train

    cfg = TrainConfig.model_validate({"data": "digits", "model": {"name": "glow"}, "anomaly_statistic": "conditional"})
    with pytest.raises(ConfigError, match="record data"):
        train(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "artifact").exists()


def test_small_csv_holds_out_a_minimum_and_calibrate_cli_recalibrates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A few hundred records: the calibration split is raised to `min_records`; fewer warn and say the resolution;
    `flowserve calibrate --data csv:FILE` recalibrates on a separate CSV without retraining."""
    import json
    import logging
    import subprocess
    import sys

    csv = tmp_path / "small.csv"
    csv.write_text(",".join(FEATURES) + "\n" + "\n".join(",".join(f"{v:.3f}" for v in r) for r in normal_records(300, 1)) + "\n")
    cfg = {"data": f"csv:{csv}", "model": {"name": "vector", "steps": 2, "hidden": 16},
           "train": {"steps": 30, "batch_size": 64, "eval_every": 30, "init_batch": 64}}
    m = train(TrainConfig.model_validate(cfg), tmp_path / "run", progress=False)
    assert m["calibration_records"] == 100  # csv's 5% (15) raised to min_records
    assert load(str(tmp_path / "run" / "artifact")).manifest.calibration.n == 100
    with caplog.at_level(logging.WARNING, logger="models.training.loop"):
        m = train(TrainConfig.model_validate({**cfg, "calibration": {"min_records": 40}}), tmp_path / "run40", progress=False)
    assert m["calibration_records"] == 40 and "resolution of 1/41" in caplog.text
    cal40 = load(str(tmp_path / "run40" / "artifact")).manifest.calibration
    assert cal40.p_value_resolution == pytest.approx(1 / 41) and cal40.proposal is not None
    other = tmp_path / "calibration.csv"
    other.write_text(",".join(FEATURES) + "\n" + "\n".join(",".join(f"{v:.3f}" for v in r) for r in normal_records(400, 2)) + "\n")
    art = tmp_path / "run40" / "artifact"
    r = subprocess.run([sys.executable, "-m", "models.cli", "calibrate", str(art), "--data", f"csv:{other}"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "calibrated on 400 records" in r.stdout
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["calibration"]["n"] == 400 and manifest["calibration"]["split"].startswith(f"csv:{other}")
    assert load(str(art)).manifest.calibration.n == 400  # the artifact still verifies and loads
    bad = subprocess.run([sys.executable, "-m", "models.cli", "calibrate", str(art), "--data", "mimic-vitals"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "the model expects" in bad.stderr
