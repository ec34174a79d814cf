"""The bundled default models: each re-evaluates to its manifest's figures and loads in the service."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from models import load
from models.bundle import BUNDLE
from models.data import load_dataset
from models.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = {"digits": 2.15, "digits-flowpp": 2.00}  # issues 2 and 6: Glow and Flow++ on digits, test bits/dim


@pytest.mark.parametrize("name", sorted(BUNDLE))
def test_bundled_artifact_reevaluates_to_its_manifest(name: str) -> None:
    path = ROOT / name / "1"
    manifest = json.loads((path / "manifest.json").read_text())
    model = load(str(path))
    m = manifest["metrics"]
    data = load_dataset(m["data"])
    result = evaluate(model, data.split("test"), m["eval_batch"], seed=m["eval_seed"])
    assert abs(result["bits_per_dim"] - m["test_bits_per_dim"]) < 1e-3
    if name in TARGETS:
        assert m["test_bits_per_dim"] <= TARGETS[name]


def test_bundled_flowpp_beats_bundled_glow() -> None:
    """Issue 6: Flow++ on digits is better than our Glow on digits (each trained within its config's budget)."""
    bpd = {n: json.loads((ROOT / n / "1" / "manifest.json").read_text())["metrics"]["test_bits_per_dim"] for n in ("digits", "digits-flowpp")}
    assert bpd["digits-flowpp"] < bpd["digits"]
