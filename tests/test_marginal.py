"""The marginal likelihood of observed features (models.anomaly.marginal) and its per-pattern calibration (models.anomaly.missing)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.anomaly.marginal import Conditional, Draws, GaussianFit, Proposal, Spike, find_spikes, log_marginal, pattern_of, plan
from models.anomaly.missing import (
    COLD_PATTERN_RECORDS,
    STORED_PATTERNS,
    NoPatternCalibration,
    PatternCalibrations,
    calibrate_patterns,
    frequent_patterns,
)
from models.anomaly.scoring import AnomalyScorer, pattern_calibration
from models.artifacts.manifest import Calibration
from models.flows import data_init


def banana_flow() -> tuple[object, np.ndarray]:
    """A small vector flow trained briefly on a 2-D banana (a non-Gaussian density), and its training data."""
    from models.architectures import build, parse_config
    from models.spec import DataSpec

    rng = np.random.default_rng(0)
    a = rng.standard_normal(4000)
    data = np.c_[a, 0.5 * a**2 + 0.4 * rng.standard_normal(4000)].astype(np.float32)
    torch.manual_seed(0)
    model = build(parse_config({"name": "vector", "steps": 4, "hidden": 32}), DataSpec(kind="record", shape=(2,)))
    model.train()
    with data_init(model), torch.no_grad():
        model.log_prob(torch.from_numpy(data[:512]))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = -model.log_prob(torch.from_numpy(data[rng.integers(0, 4000, 256)])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), data


def flow_score(model) -> object:  # noqa: ANN001
    def score(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        with torch.no_grad():
            return model.log_prob(torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))).double().numpy()

    return score


def quadrature(score, x1: float, lo: float = -12.0, hi: float = 25.0, n: int = 200_001) -> float:  # noqa: ANN001
    """log ∫ p(x1, x2) dx2 by the trapezoid rule on a fine grid."""
    g = np.linspace(lo, hi, n)
    lp = score(np.c_[np.full(n, x1), g], None)
    m = lp.max()
    return float(m + np.log(np.trapezoid(np.exp(lp - m), g)))


def test_marginal_matches_exact_integration_on_a_2d_flow() -> None:
    model, data = banana_flow()
    score = flow_score(model)
    proposal = Proposal(GaussianFit.fit(data))
    x1 = np.linspace(-2.5, 2.5, 21).astype(np.float32)
    x = np.c_[x1, np.zeros_like(x1)]
    observed = np.array([[True, False]] * len(x))
    exact = np.array([quadrature(score, float(v)) for v in x1])
    err = {k: log_marginal(score, x, observed, proposal, None, samples=k) - exact for k in (8, 64, 4096)}
    # consistent: the error shrinks with K (the linear-Gaussian proposal is poor in the banana's arms, |x1| ≈ 2.5)
    assert np.abs(err[4096]).max() < 0.1, err[4096]
    assert np.abs(err[64]).mean() < 0.3 and np.abs(err[64]).mean() < np.abs(err[8]).mean()
    x, observed = x[::5], observed[::5]
    est = {64: (err[64] + exact)[::5]}
    # the absent value of x does not matter, and nothing absent is the exact log-density
    assert np.array_equal(log_marginal(score, x + np.array([0, 7.0], dtype=np.float32), observed, proposal, None, 64), est[64])
    full = log_marginal(score, x, np.ones_like(observed), proposal, None, 64)
    assert np.array_equal(full, score(x, None))


def test_complete_records_take_one_row_and_patterns_are_deterministic() -> None:
    fit = GaussianFit.fit(np.random.default_rng(1).standard_normal((500, 3)))
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)
    p = plan(x, (0, 1, 2), Proposal(fit), None, samples=32)
    assert p.samples == 1 and p.rows.shape == (4, 3) and not p.log_q.any()
    a = plan(x, (0, 2), Proposal(fit), None, samples=32)
    b = plan(x[2:3], (0, 2), Proposal(fit), None, samples=32)
    assert a.rows.shape == (4 * 32, 3)
    assert np.array_equal(a.rows.reshape(4, 32, 3)[2], b.rows) and np.array_equal(a.log_q[2], b.log_q[0])  # batch-mates do not matter
    assert np.allclose(a.rows.reshape(4, 32, 3)[:, :, [0, 2]], x[:, None, [0, 2]])  # observed features are kept


def test_proposal_density_is_normalised() -> None:
    """q integrates to 1 over the absent features (a 1-D check, with and without a spike component)."""
    rng = np.random.default_rng(3)
    fit = GaussianFit.fit(np.c_[rng.standard_normal(2000), 0.2 + 0.1 * rng.standard_normal(2000)])
    x = np.array([[0.5, 0.0]])
    grid = np.linspace(-1.5, 2.0, 400_001)
    for spikes in ((), (Spike(1, 0.21, 1e-3, 0.7),)):
        cond = Conditional.of(Proposal(fit, spikes), (0,))
        draws = Draws(np.zeros((len(grid), 1)), np.ones(len(grid)), np.ones((len(grid), len(spikes))), np.zeros((len(grid), len(spikes))))
        # evaluate log q on the grid by placing the "draws" there: a diffuse draw equal to each grid point
        loc = fit.mean[1] + (x[0, 0] - fit.mean[0]) * fit.cov[0, 1] / fit.cov[0, 0]
        scale = math.sqrt((cond.df + (x[0, 0] - fit.mean[0]) ** 2 / fit.cov[0, 0]) / cond.dof)
        draws.eps[:, 0] = (grid - loc) / (scale * cond.l_cond[0, 0])
        xm, log_q = cond.draw(x, draws)
        assert np.allclose(xm[0, :, 0], grid)
        assert np.trapezoid(np.exp(log_q[0]), grid) == pytest.approx(1.0, abs=2e-3)


def spike_density(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
    """A 2-D density with a point-mass-like spike: x2 ~ 0.7 N(0.21, 1e-4²) + 0.3 N(0.5, 0.1²), x1 ~ N(x2, 1)."""
    x1, x2 = rows[:, 0].astype(np.float64), rows[:, 1].astype(np.float64)

    def log_n(v: np.ndarray, m: float, s: float) -> np.ndarray:
        return -0.5 * ((v - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    mix = np.logaddexp(math.log(0.7) + log_n(x2, 0.21, 1e-4), math.log(0.3) + log_n(x2, 0.5, 0.1))
    return mix + log_n(x1, x2, 1.0)


def test_spikes_are_measured_and_integrated() -> None:
    rng = np.random.default_rng(4)
    on = rng.random(5000) < 0.7
    x2 = np.where(on, np.float32(0.21), rng.normal(0.5, 0.1, 5000)).astype(np.float32)
    train = np.c_[x2 + rng.standard_normal(5000), x2].astype(np.float32)
    spikes = find_spikes(spike_density, train, None, [(1, float(np.float32(0.21)))])
    assert len(spikes) == 1 and spikes[0].feature == 1 and 3e-5 < spikes[0].scale < 3e-4  # σ = 1e-4
    x = np.array([[0.2, 0.0], [1.5, 0.0], [-1.0, 0.0]], dtype=np.float32)
    observed = np.array([[True, False]] * 3)
    # exact: p(x1) = 0.7 N(x1; 0.21, ~1) + 0.3 N(x1; 0.5, √(1 + 0.01))
    exact = np.logaddexp(math.log(0.7) - 0.5 * (x[:, 0] - 0.21) ** 2 - 0.5 * math.log(2 * math.pi),
                         math.log(0.3) - 0.5 * (x[:, 0] - 0.5) ** 2 / 1.01 - 0.5 * math.log(2 * math.pi * 1.01))
    with_spikes = {k: log_marginal(spike_density, x, observed, Proposal(GaussianFit.fit(train), tuple(spikes)), None, k) for k in (64, 4096)}
    without = log_marginal(spike_density, x, observed, Proposal(GaussianFit.fit(train)), None, 64)
    assert np.abs(with_spikes[64] - exact).max() < 0.15 and np.abs(with_spikes[4096] - exact).max() < 0.02
    assert np.abs(without - exact).max() > 0.5  # a diffuse proposal misses the spike's mass


def test_discrete_absent_features_integrate_over_their_bins() -> None:
    """An absent integer feature: the estimate sums the bin probabilities (a dequantized density)."""
    pmf = np.array([0.1, 0.2, 0.4, 0.3])

    def score(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        v = rows[:, 1].astype(np.float64) + (0.0 if noise is None else noise[:, 1])  # dequantized value in [0, 4)
        inside = (v >= 0) & (v < 4)
        k = np.clip(np.floor(v), 0, 3).astype(int)
        return np.where(inside, np.log(pmf[k]), -np.inf) - 0.5 * rows[:, 0].astype(np.float64) ** 2 - 0.5 * math.log(2 * math.pi)

    rng = np.random.default_rng(5)
    train = np.c_[rng.standard_normal(4000), rng.choice(4, 4000, p=pmf)].astype(np.float32)
    x = np.array([[0.3, 2.0]], dtype=np.float32)
    est = log_marginal(score, x, np.array([[True, False]]), Proposal(GaussianFit.fit(train, [1])), [1], 4096)
    assert est[0] == pytest.approx(-0.5 * 0.09 - 0.5 * math.log(2 * math.pi), abs=0.03)  # Σ pmf = 1
    full = log_marginal(score, x, np.array([[True, True]]), Proposal(GaussianFit.fit(train, [1])), [1], 64)
    assert full[0] == pytest.approx(math.log(0.4) - 0.5 * 0.09 - 0.5 * math.log(2 * math.pi))  # scored at the bin midpoint


def gaussian_world(d: int = 4):  # noqa: ANN201
    rng = np.random.default_rng(6)
    a = rng.standard_normal((d, d))
    cov = a @ a.T + d * np.eye(d)
    chol = np.linalg.cholesky(cov)

    def score(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        z = np.linalg.solve(chol, rows.astype(np.float64).T).T
        return -0.5 * (z**2).sum(1) - np.log(np.diag(chol)).sum() - 0.5 * d * math.log(2 * math.pi)

    def draw(n: int, seed: int) -> np.ndarray:
        return (np.random.default_rng(seed).standard_normal((n, d)) @ chol.T).astype(np.float32)

    return score, draw


@pytest.mark.parametrize("cold_records", [None, COLD_PATTERN_RECORDS])
def test_pattern_calibration_holds_the_false_positive_rate_per_pattern(cold_records: int | None) -> None:
    """With every usable calibration record (1,000, as stored patterns are built) and with the cap on patterns built
    on first use (200), the realised rate holds per pattern."""
    score, draw = gaussian_world()
    train, normal = draw(4000, 1), draw(1000, 2)
    cal = Calibration(scores=[0.0], proposal=Proposal(GaussianFit.fit(train)).to_dict(), records=normal.tolist(),
                      known=np.ones(normal.shape, dtype=int).tolist())
    pcal = PatternCalibrations(cal, None, samples=32, cold_records=cold_records)
    fresh = draw(4000, 3)
    for pattern in [(0,), (1, 3), (0, 1, 2)]:
        scorer = pcal.scorer(pattern, score)
        assert scorer.n == (cold_records or 1000) and pcal.cached(pattern) is scorer
        nll = -pcal.log_marginal(fresh, pattern, score)
        realised = np.mean(scorer.p_values(nll) <= 0.05)
        assert abs(realised - 0.05) < 0.02, (pattern, realised)
        # an anomaly in an observed feature is flagged
        odd = fresh[:20].copy()
        odd[:, pattern[0]] += 6 * fresh[:, pattern[0]].std()
        assert (scorer.p_values(-pcal.log_marginal(odd, pattern, score)) <= 0.05).mean() > 0.9


def test_pattern_calibration_uses_only_records_that_measured_the_pattern() -> None:
    score, draw = gaussian_world()
    normal = draw(100, 2)
    known = np.ones(normal.shape, dtype=bool)
    known[:90, 3] = False  # feature 3 never measured in 90 of the calibration records
    cal = Calibration(scores=[0.0], proposal=Proposal(GaussianFit.fit(draw(1000, 1))).to_dict(), records=normal.tolist(),
                      known=known.astype(int).tolist())
    pcal = PatternCalibrations(cal, None, samples=8, min_records=5)
    assert pcal.scorer((0, 1), score).n == 100 and pcal.scorer((0, 3), score).n == 10
    with pytest.raises(NoPatternCalibration, match="only 10 calibration records"):
        PatternCalibrations(cal, None, samples=8, min_records=20).scorer((3,), score)


def test_pattern_calibration_refits_the_atoms_of_observed_features() -> None:
    records = np.c_[np.where(np.arange(200) % 2, 0.21, 0.5), np.arange(200.0)].astype(np.float32)
    nll = np.where(records[:, 0] == np.float32(0.21), -5.0, 2.0) + 0.01 * records[:, 1]
    base = Calibration(scores=[0.0], statistic="conditional", atoms=[(0, float(np.float32(0.21)))])
    with_atom = pattern_calibration(base, (0, 1), nll, records)
    assert with_atom.atoms == [(0, float(np.float32(0.21)))] and with_atom.atom_effects[1] == pytest.approx(-7.0, abs=0.02)
    without = pattern_calibration(base, (1,), nll, records)
    assert without.atoms == [] and len(without.atom_effects) == 1
    assert AnomalyScorer(with_atom).resolve(None) == "conditional" and with_atom.n == 200


def test_patterns_of_masks() -> None:
    assert pattern_of(np.array([True, False, True])) == (0, 2)
    with pytest.raises(ValueError, match="recalibrate"):
        PatternCalibrations(Calibration(scores=[1.0]), None)


def test_frequent_patterns_leave_out_complete_and_empty_records() -> None:
    measured = np.array([[1, 1, 0]] * 5 + [[1, 0, 1]] * 3 + [[1, 1, 1]] * 9 + [[0, 0, 0]] * 9 + [[0, 1, 0]] * 1, dtype=bool)
    assert frequent_patterns(measured) == [(0, 1), (0, 2), (1,)]
    assert frequent_patterns(measured, top=1) == [(0, 1)]


def test_stored_patterns_are_used_without_scoring_and_only_at_their_k() -> None:
    """A pattern calibrated into the artifact answers without a flow call and equals one built on first use from every
    record; stored with another K it is ignored (its scores would compare a different estimator)."""
    score, draw = gaussian_world()
    normal = draw(300, 2)
    cal = Calibration(scores=[0.0], proposal=Proposal(GaussianFit.fit(draw(2000, 1))).to_dict(), records=normal.tolist(),
                      known=np.ones(normal.shape, dtype=int).tolist())
    cal.patterns = calibrate_patterns(cal, None, [(0, 2), (1,)], score, samples=16)
    assert [p.pattern for p in cal.patterns] == [[0, 2], [1]] and all(p.n == 300 and p.samples == 16 for p in cal.patterns)

    def no_flow(rows: np.ndarray, noise: np.ndarray | None) -> np.ndarray:
        raise AssertionError("a stored pattern must not be built again")

    warm = PatternCalibrations(cal, None, samples=16)
    fresh = draw(50, 3)
    built = PatternCalibrations(cal, None, samples=16, cold_records=None)
    built.stored.clear()
    nll = -warm.log_marginal(fresh, (0, 2), score)
    np.testing.assert_allclose(warm.scorer((0, 2), no_flow).p_values(nll), built.scorer((0, 2), score).p_values(nll), atol=1e-6)
    assert warm.scorer((1,), no_flow).n == 300
    other_k = PatternCalibrations(cal, None, samples=32)
    assert other_k.stored == {} and other_k.scorer((0, 2), score).n == COLD_PATTERN_RECORDS


def test_the_bundled_vitals_model_starts_warm_at_the_services_k() -> None:
    """The bundled mimic-vitals artifact stores its training data's most frequent patterns at the K the service uses."""
    from models.artifacts import store as artifact
    from service.settings import Settings

    cal = artifact.read_manifest(Path(__file__).resolve().parent.parent / "model_repository" / "mimic-vitals" / "1").calibration
    k = Settings().anomaly_samples
    assert len(cal.patterns) == STORED_PATTERNS and all(p.samples == k for p in cal.patterns)
    assert len(PatternCalibrations(cal, [], samples=k).stored) == STORED_PATTERNS
