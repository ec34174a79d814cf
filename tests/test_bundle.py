"""The bundled default models: each re-evaluates to its manifest's figures and loads in the service."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import load
from models.anomaly.scoring import AnomalyScorer
from models.data import load_dataset
from models.data.cohort import generate_vitals, generate_waveforms
from models.training.bundle import BUNDLE
from models.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = {"digits": 2.15, "digits-flowpp": 2.00}  # issues 2 and 6: Glow and Flow++ on digits, test bits/dim


@pytest.fixture(scope="module")
def fresh_bits_per_dim() -> dict[str, float]:
    """Test bits/dim of each bundled model, evaluated now from its weights (not read from its manifest)."""
    out = {}
    for name in sorted(BUNDLE):
        path = ROOT / name / "1"
        m = json.loads((path / "manifest.json").read_text())["metrics"]
        data = load_dataset(m["data"])
        out[name] = evaluate(load(str(path)), data.split("test"), m["eval_batch"], seed=m["eval_seed"])["bits_per_dim"]
    return out


@pytest.mark.parametrize("name", sorted(BUNDLE))
def test_bundled_artifact_reevaluates_to_its_manifest(name: str, fresh_bits_per_dim: dict[str, float]) -> None:
    m = json.loads((ROOT / name / "1" / "manifest.json").read_text())["metrics"]
    assert abs(fresh_bits_per_dim[name] - m["test_bits_per_dim"]) < 1e-3
    if name in TARGETS:
        assert fresh_bits_per_dim[name] <= TARGETS[name]


def test_bundled_flowpp_beats_bundled_glow(fresh_bits_per_dim: dict[str, float]) -> None:
    """Issue 6: Flow++ on digits is better than our Glow on digits (each trained within its config's budget)."""
    assert fresh_bits_per_dim["digits-flowpp"] < fresh_bits_per_dim["digits"]


def _default_statistic(name: str, x: np.ndarray) -> tuple[np.ndarray, AnomalyScorer]:
    import torch

    from models.anomaly.scoring import scoring_noise

    model = load(str(ROOT / name / "1")).eval()
    scorer = AnomalyScorer(model.manifest.calibration)
    with torch.no_grad():
        noise = scoring_noise(model.spec, len(x))
        nll = -model.log_prob(torch.from_numpy(x), None if noise is None else torch.from_numpy(noise)).double().numpy()
    return nll, scorer


def test_bundled_anomaly_models_hold_the_target_false_positive_rate_on_new_patients() -> None:
    """Issue 3: at a 1% target, the realised rate on fresh normal patients is within ±1 percentage point,
    and not zero (a scorer that never flags would pass a one-sided bound)."""
    from models.data.mimic import impute, scale_windows

    v = generate_vitals(60, 48, seed=202)
    w = generate_waveforms(500, 2, seed=404)
    for name, x in (("mimic-vitals", impute(v.values, v.patient).values), ("mimic-waveform", scale_windows(w.windows, "global"))):
        nll, scorer = _default_statistic(name, x)
        realised = np.mean(scorer.p_values(nll, x=x) <= 0.01)
        assert 0.0025 <= realised <= 0.02, (name, realised)


def test_bundled_waveform_model_finds_every_planted_kind() -> None:
    """Issue 3: with its default (typicality) statistic the waveform flow separates each anomaly kind from normal windows."""
    from sklearn.metrics import roc_auc_score

    from models.data.mimic import scale_windows
    from models.data.mimic_schema import WAVE_ANOMALIES

    c = generate_waveforms(100, 4, seed=303, anomaly_fraction=0.4)
    nll, scorer = _default_statistic("mimic-waveform", scale_windows(c.windows, "global"))
    assert scorer.default == "typicality"
    s = scorer.statistic(nll)
    for kind in WAVE_ANOMALIES:
        rows = (c.kind == "normal") | (c.kind == kind)
        assert roc_auc_score(c.kind[rows] == kind, s[rows]) > 0.85, kind


def test_evaluation_accepts_read_only_arrays_without_warnings(fresh_bits_per_dim: dict[str, float]) -> None:
    """Loaders hand out read-only arrays (IDX buffers, memory maps); evaluating one must neither warn
    (torch warns on non-writable arrays, once per process, hence a fresh interpreter where that
    warning is an error) nor change the figure."""
    import subprocess
    import sys

    code = (
        "import json, sys, numpy as np\n"
        "from models import load\nfrom models.data import load_dataset\nfrom models.training.evaluate import evaluate\n"
        "path = sys.argv[1]\nm = json.load(open(path + '/manifest.json'))['metrics']\n"
        "test = np.array(load_dataset(m['data']).split('test'))\ntest.setflags(write=False)\n"
        "print(repr(evaluate(load(path), test, m['eval_batch'], seed=m['eval_seed'])['bits_per_dim']))\n"
    )
    out = subprocess.run([sys.executable, "-W", "error:The given NumPy array is not writable", "-c", code, str(ROOT / "digits" / "1")],
                         capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) == fresh_bits_per_dim["digits"]


def test_manifest_is_written_compactly_and_reads_back_unchanged(tmp_path: Path) -> None:
    """Flat lists of numbers (shapes, calibration scores, including negative, exponent and integer values) go on one
    line; nested lists and strings keep their layout; parsing gives back exactly what was written."""
    import json
    import shutil

    from models.artifacts.manifest import read_manifest, write_manifest

    shutil.copy(ROOT / "mimic-vitals" / "1" / "manifest.json", tmp_path / "manifest.json")
    manifest = read_manifest(tmp_path)
    cal = manifest.calibration.model_copy(update={"scores": [-1.5, 2e-07, 3, 1.25e+30]})
    manifest = manifest.model_copy(update={"calibration": cal})
    write_manifest(tmp_path, manifest)
    text = (tmp_path / "manifest.json").read_text()
    assert '"scores": [-1.5, 2e-07, 3.0, 1.25e+30]' in text and '"shape": [17]' in text
    assert '"reference": [\n' in text  # a nested list keeps its layout
    assert json.loads(text)["calibration"] == cal.model_dump(mode="json", exclude_none=True) and read_manifest(tmp_path) == manifest
