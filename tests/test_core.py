"""The inference core's own rules, without a server: out-of-support rows are refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from models.spec import DataSpec
from service.core.inference import OutOfSupport, check_support

RECORD = DataSpec(kind="record", shape=(2,), feature_names=["hr", "sbp"], ranges=[(30, 200), (60, 230)])
WAVE = DataSpec(kind="waveform", shape=(2, 4), feature_names=["PLETH", "ABP"], ranges=[(-1, 1), (40, 200)])
IMAGE = DataSpec(kind="image", shape=(1, 2, 2), levels=4)


def test_finite_scores_pass() -> None:
    check_support(RECORD, np.zeros((2, 2)), np.array([-1.0, -2.0]), "records")


@pytest.mark.parametrize(("spec", "x", "names"), [
    (RECORD, np.array([[80, 120], [1e30, 120]]), ["hr = 1e+30 (range 30..200)"]),
    (WAVE, np.stack([np.zeros((2, 4)), np.array([[0, 0, 5, 0], [100, 100, 100, 900]])]),
     ["PLETH = 0..5 (range -1..1)", "ABP = 100..900 (range 40..200)"]),
    (IMAGE, np.zeros((2, 1, 2, 2)), []),
])
def test_non_finite_rows_are_refused_naming_the_row_and_features(spec: DataSpec, x: np.ndarray, names: list[str]) -> None:
    with pytest.raises(OutOfSupport) as e:
        check_support(spec, x, np.array([-3.0, -np.inf]), "rows")
    assert e.value.status == 400 and e.value.message.startswith("rows[1]: outside the model's support")
    for n in names:
        assert n in e.value.message
    if not names:
        assert "ranges" not in e.value.message


def test_a_value_on_a_range_edge_is_inside_it_after_float32_decoding() -> None:
    """Rows arrive as float32 (FiO2 0.21 → 0.2099999934), so the ranges are compared in float32 too."""
    spec = DataSpec(kind="record", shape=(2,), feature_names=["fio2", "hr"], ranges=[(0.21, 1.0), (30, 200)])
    x = np.array([[0.21, 80], [0.21, 1e30]], dtype=np.float32)
    with pytest.raises(OutOfSupport) as e:
        check_support(spec, x, np.array([-3.0, -np.inf]), "records")
    assert e.value.message.endswith("outside the schema's ranges: hr = 1e+30 (range 30..200)"), e.value.message
