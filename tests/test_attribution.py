"""Attribution by counterfactual replacement: variants, aggregation, and finding a planted anomaly."""

from __future__ import annotations

import numpy as np

from models.anomaly.attribution import (
    attribute,
    beat_period,
    feature_variants,
    reference_values,
    segment_bounds,
    segment_variants,
)


def test_feature_variants_replace_exactly_one_feature() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    ref = np.array([[10.0, 11.0], [20.0, 21.0], [30.0, 31.0]])
    v = feature_variants(x, ref).reshape(2, 3, 2, 3)
    for b in range(2):
        for k in range(3):
            for m in range(2):
                expect = x[b].copy()
                expect[k] = ref[k, m]
                np.testing.assert_array_equal(v[b, k, m], expect)


def test_reference_values_keep_discrete_features_integer() -> None:
    rng = np.random.default_rng(0)
    data = np.stack([rng.normal(size=500), rng.integers(1, 5, 500)], 1)
    ref = reference_values(data, m=9, discrete=[1])
    assert ref.shape == (2, 9) and np.all(ref[1] == np.round(ref[1]))


def test_planted_feature_ranks_first_under_a_gaussian_score() -> None:
    rng = np.random.default_rng(1)
    normal = rng.normal(size=(2000, 6))
    ref = reference_values(normal)
    x = rng.normal(size=(200, 6))
    planted = rng.integers(0, 6, 200)
    x[np.arange(200), planted] += rng.choice([-1, 1], 200) * rng.uniform(5, 8, 200)

    def score(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        return 0.5 * (rows.astype(np.float64) ** 2).sum(1)

    a = attribute(score, x.astype(np.float32), None, ref)
    assert a.shape == (200, 6) and (a >= 0).all()
    assert np.mean(a.argmax(1) == planted) >= 0.99


def test_segment_variants_copy_the_neighbouring_beat() -> None:
    t = np.arange(1024) / 125
    x = np.stack([np.sin(2 * np.pi * 1.25 * t), np.cos(2 * np.pi * 1.25 * t)])[None].astype(np.float32)  # 0.8 s period
    assert abs(beat_period(x[0]) - 100) <= 1
    flat = x.copy()
    flat[0, :, 300:500] = 0.0
    v = segment_variants(flat, 16).reshape(16, 2, 1024)
    s, e = segment_bounds(1024, 16)[5]  # inside the flat stretch
    assert np.abs(v[5, :, s:e]).max() > 0.5  # replaced by signal one period away
    np.testing.assert_array_equal(v[5, :, :s], flat[0, :, :s])  # the rest is untouched
