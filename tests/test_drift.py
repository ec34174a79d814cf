"""Drift alarms: the detector's recursion and false-alarm guarantee (models.anomaly.drift), the per-version
stream table (service.core.drift), and the routes through a real server with front-ends and an executor."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.anomaly.drift import Bet, DriftConfig, DriftDetector, DriftFamily, dirichlet_quantile, first_alarms
from service.core.drift import DriftMonitor
from service.errors import NotFound

from .server import running_server

ROOT = Path(__file__).resolve().parent.parent


def naive_log_r(family: DriftFamily, p: np.ndarray, n: int) -> np.ndarray:
    """``log R_t`` of the mixture by the plain recursion ``R_t = (1 + R_{t−1}) Λ_t``, one record at a time."""
    lr = family.log_ratios(p, np.full(len(p), n))
    r = np.zeros(lr.shape[1])
    out = []
    for row in np.exp(lr):
        r = (1 + r) * row
        out.append(math.log(float(np.exp(family.log_weights) @ r)))
    return np.array(out)


def test_batched_update_is_the_shiryaev_roberts_recursion_however_the_stream_is_cut() -> None:
    family = DriftFamily(DriftConfig(ert=50))
    rng = np.random.default_rng(0)
    p = rng.integers(1, 202, 300) / 201
    p[200:] = rng.integers(1, 20, 100) / 201  # a change: the statistic climbs to large values
    expect = naive_log_r(family, p, 200)
    one = DriftDetector(family)
    one.update(p, np.full(300, 200))
    pieces = DriftDetector(family)
    for a, b in [(0, 1), (1, 77), (77, 78), (78, 300)]:
        reading = pieces.update(p[a:b], np.full(b - a, 200))
    assert np.isclose(one.reading().statistic, expect[-1], rtol=1e-9)
    assert np.isclose(reading.statistic, expect[-1], rtol=1e-9)
    assert one.state.alarm_at == pieces.state.alarm_at == int(np.argmax(expect >= math.log(50))) + 1
    assert reading.direction == "unusual" and reading.records == 300
    assert np.isclose(reading.peak, expect.max(), rtol=1e-9)


def test_likelihood_ratios_have_conditional_mean_at_most_one_for_the_confidence_share_of_calibration_sets() -> None:
    """E[Λ | calibration] = Σ_k Λ(k) D_k with D ~ Dirichlet(1, …, 1): at most 1 for ≥ 95% of calibration sets (fresh draws)."""
    n = 300
    family = DriftFamily(DriftConfig(confidence=0.95))
    lam = np.exp(family.grid(n).log_ratio)  # (n + 1, J)
    d = np.random.default_rng(1).dirichlet(np.ones(n + 1), 4000)
    share_ok = ((d @ lam) <= 1).mean(0)
    assert (share_ok >= 0.93).all(), share_ok
    assert (share_ok <= 0.97).all(), share_ok  # and not much more conservative than asked
    uniform = lam.mean(0)  # over calibration sets (the uniform grid): below 1 by the correction
    assert ((uniform < 1) & (uniform > 0.9)).all()


def test_dirichlet_quantile_of_a_constant_is_the_constant() -> None:
    assert np.allclose(dirichlet_quantile(np.full((11, 2), 3.0), 0.9), 3.0)


def test_mean_run_length_without_drift_is_at_least_the_ert_for_a_fixed_calibration_set() -> None:
    """Streams of normal records against one fixed calibration set: the mean run length to a false alarm ≥ ERT."""
    ert, n = 40, 500
    family = DriftFamily(DriftConfig(ert=ert))
    rng = np.random.default_rng(2)
    runs = []
    for _ in range(10):  # ten calibration sets, each with its own conditional law of the p-values
        d = rng.dirichlet(np.ones(n + 1))
        k = rng.choice(n + 1, (60, 1500), p=d) + 1
        runs.append(first_alarms(family, k / (n + 1), n))
    runs = np.concatenate(runs)
    assert runs.mean() - 2 * runs.std() / math.sqrt(len(runs)) >= ert, runs.mean()
    assert runs.mean() < 20 * ert  # an alarm does come: the test is not vacuous


def test_calibration_records_that_share_patients_keep_the_ert_when_their_units_are_counted() -> None:
    """Scores ``s = μ_patient + ε`` (patient sd = record sd): calibrations of 40 patients × 25 records, streams of records from new patients.
    The guarantee is per calibration set: counted as 40 units, no calibration set's mean run length to a false alarm
    is clearly below the ERT; counted as 1,000 independent records, several are."""
    ert, patients, per = 200, 40, 25
    rng = np.random.default_rng(5)
    below: dict[int, int] = {patients: 0, patients * per: 0}
    for _ in range(12):  # calibration sets
        cal = np.sort((rng.normal(0, 1.0, patients)[:, None] + rng.standard_normal((patients, per))).ravel())
        new = rng.normal(0, 1.0, (40, 4000)) + rng.standard_normal((40, 4000))  # each record from a new patient
        p = (1 + len(cal) - np.searchsorted(cal, new, side="left")) / (len(cal) + 1)
        for units in below:
            runs = first_alarms(DriftFamily(DriftConfig(ert=ert)), p, len(cal), units)
            below[units] += int(runs.mean() + 2 * runs.std() / math.sqrt(len(runs)) < ert)
    assert below[patients] == 0, below
    assert below[patients * per] >= 3, below


@pytest.mark.parametrize("side", ["unusual", "typical"])
def test_it_alarms_on_either_side(side: str) -> None:
    n = 1000
    family = DriftFamily(DriftConfig(ert=1000))
    rng = np.random.default_rng(3)
    u = rng.beta(1, 2, (50, 400))  # mass near 0: unusual records; mirrored: too typical
    p = np.ceil((u if side == "unusual" else 1 - u) * (n + 1)).clip(1, n + 1) / (n + 1)
    firsts = first_alarms(family, p, n)
    assert (firsts <= 400).all() and np.median(firsts) < 150
    det = DriftDetector(family)
    assert det.update(p[0], np.full(400, n)).direction == side
    one_sided = DriftFamily(DriftConfig(ert=1000, sides=["unusual" if side == "typical" else "typical"]))
    assert (first_alarms(one_sided, p[:10], n) > 400).all()  # the other side alone does not see it


def test_records_against_different_calibration_sizes_share_a_stream() -> None:
    family = DriftFamily(DriftConfig(ert=100, bets=[Bet(power=0.5, weight=1.0)]))
    det = DriftDetector(family)
    reading = det.update(np.array([0.5, 1 / 201, 1.0, 3 / 1001]), np.array([200, 200, 1000, 1000]), np.array([200, 200, 1000, 40]))
    assert reading.records == 4 and np.isfinite(reading.statistic)
    assert set(family._grids) == {(200, 200), (1000, 1000), (1000, 40)}
    assert family.grid(1000, 40).quantile[0] > family.grid(1000).quantile[0]  # fewer independent units: a larger correction
    with pytest.raises(ValueError, match="p-values"):
        det.update(np.array([0.0]), np.array([10]))
    with pytest.raises(ValueError, match="p-values"):
        det.update(np.array([np.nan]), np.array([10]))


def test_monitor_keeps_at_most_its_streams_and_resets() -> None:
    mon = DriftMonitor(DriftConfig(ert=100), streams=2)
    for s in ["a", "b", "a", "c"]:  # "b" is the least recently fed when "c" arrives
        mon.update(s, np.array([0.5]), np.array([99]), np.array([99]))
    assert list(mon.readings()) == ["a", "c"]
    assert mon.readings("a")["a"].records == 2
    with pytest.raises(NotFound):
        mon.readings("b")
    assert mon.reset("a") == ["a"] and list(mon.readings()) == ["c"]
    assert mon.reset() == ["c"] and mon.readings() == {}


# --- through a real server ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records() -> tuple[list[str], np.ndarray]:
    """Records of 400 fresh patients (not the bundled model's) over whole 48-hour stays, as the calibration's patients
    were (the first hours of stays alone are another population), rows shuffled across patients as a ward's feed."""
    from models.data.cohort import generate_vitals
    from models.data.mimic import impute
    from models.data.mimic_schema import VITAL_NAMES

    c = generate_vitals(400, 48, seed=909)
    x = impute(c.values, c.patient).values
    return list(VITAL_NAMES), x[np.random.default_rng(4).permutation(len(x))]


@pytest.fixture(scope="module")
def drift_server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    tmp = tmp_path_factory.mktemp("drift")
    repo = tmp / "repository"
    shutil.copytree(ROOT / "model_repository" / "mimic-vitals", repo / "mimic-vitals")
    with running_server(repo, tmp, FLOWSERVE_HTTP_WORKERS="2", FLOWSERVE_DRIFT_ERT="1000", FLOWSERVE_DRIFT_STREAMS="3") as s:
        yield s, repo


def metrics_once(server, ready) -> str:  # noqa: ANN001
    """``/metrics`` once ``ready(text)`` holds: an executor rewrites its drift table within 0.25 s of a change."""
    deadline = time.monotonic() + 10
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=10).text
        if ready(text) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def post(server, names: list[str], rows: np.ndarray, stream: str, drop: tuple[str, ...] = ()) -> dict:  # noqa: ANN001
    """One anomaly request on a fresh connection (the kernel spreads them over the front-ends)."""
    body = {"records": [{k: float(v) for k, v in zip(names, r) if k not in drop} for r in rows], "explain": "none", "stream": stream}
    with httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/v1/models/mimic-vitals/anomaly", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_normal_records_raise_no_alarm_and_a_stuck_heart_rate_does(drift_server, records) -> None:  # noqa: ANN001
    server, _ = drift_server
    names, x = records
    for i in range(6):  # 300 normal records, 50 per request, through whichever front-end takes each connection
        d = post(server, names, x[50 * i : 50 * (i + 1)], "ward-normal")["drift"]
    assert d["stream"] == "ward-normal" and d["records"] == 300
    assert not d["alarm"] and d.get("alarm_at") is None and d["peak"] < d["threshold"] == pytest.approx(math.log(1000))
    stuck = x[300:1100].copy()
    stuck[:, names.index("Heart Rate")] = np.median(x[:, names.index("Heart Rate")])
    alarms = [post(server, names, stuck[100 * i : 100 * (i + 1)], "ward-stuck")["drift"] for i in range(8)]
    last = alarms[-1]
    assert last["alarm"] and last["direction"] == "typical" and last["records"] == 800
    assert last["alarm_at"] <= 800 and last["peak"] >= last["threshold"]  # the alarm stays raised below it afterwards
    with httpx.Client(base_url=server.url) as c:
        both = c.get("/v1/models/mimic-vitals/drift").json()
        assert {s["stream"] for s in both["streams"]} >= {"ward-normal", "ward-stuck"} and both["ert"] == 1000
        assert c.get("/v1/models/mimic-vitals/drift", params={"stream": "ward-stuck"}).json()["streams"][0]["alarm"]
    metrics = metrics_once(server, lambda t: 'flowserve_drift_records{model="mimic-vitals",stream="ward-stuck",version="1"} 800.0' in t)
    assert 'flowserve_drift_alarm{model="mimic-vitals",stream="ward-stuck",version="1"} 1.0' in metrics
    assert 'flowserve_drift_alarm{model="mimic-vitals",stream="ward-normal",version="1"} 0.0' in metrics
    assert 'flowserve_drift_alarms_total{model="mimic-vitals"}' in metrics


def test_reset_clears_a_stream_and_the_next_record_starts_it_afresh(drift_server, records) -> None:  # noqa: ANN001
    server, _ = drift_server
    names, x = records
    post(server, names, x[:20], "ward-reset")
    with httpx.Client(base_url=server.url) as c:
        r = c.post("/v1/models/mimic-vitals/drift/reset", params={"stream": "ward-reset"})
        assert r.status_code == 200 and r.json()["reset"] == ["ward-reset"]
        gone = c.get("/v1/models/mimic-vitals/drift", params={"stream": "ward-reset"})
        assert gone.status_code == 404 and "ward-reset" in gone.json()["error"]
        assert c.post("/v1/models/mimic-vitals/drift/reset", params={"stream": "never-seen"}).status_code == 404
        bad = c.get("/v1/models/mimic-vitals/drift", params={"stream": "a b"})
        assert bad.status_code == 400 and "stream" in bad.text
    assert post(server, names, x[20:25], "ward-reset")["drift"]["records"] == 5


def test_records_with_absent_features_feed_the_stream_with_their_patterns_p_values(drift_server, records) -> None:  # noqa: ANN001
    server, _ = drift_server
    names, x = records
    out = post(server, names, x[:10], "ward-partial", drop=("Glucose", "pH"))
    assert all(r["absent"] == ["Glucose", "pH"] for r in out["results"])
    assert out["drift"]["records"] == 10 and math.isfinite(out["drift"]["statistic"])


def test_streams_are_bounded_in_the_api_and_in_prometheus(drift_server, records) -> None:  # noqa: ANN001
    server, _ = drift_server
    names, x = records
    for k in range(6):
        post(server, names, x[k : k + 1], f"bounded-{k}")
    with httpx.Client(base_url=server.url) as c:
        listed = [s["stream"] for s in c.get("/v1/models/mimic-vitals/drift").json()["streams"]]
        metrics = metrics_once(server, lambda t: 'stream="bounded-5"' in t)
        bad = c.post("/v1/models/mimic-vitals/anomaly", json={"records": [dict(zip(names, map(float, x[0])))], "stream": "x" * 65})
    assert listed == ["bounded-3", "bounded-4", "bounded-5"]  # FLOWSERVE_DRIFT_STREAMS=3, least recently fed out
    labelled = {line.split('stream="')[1].split('"')[0] for line in metrics.splitlines() if line.startswith("flowserve_drift_statistic{")}
    assert labelled == set(listed)
    assert bad.status_code == 400 and "stream" in bad.text


def test_a_reload_starts_drift_afresh_for_the_new_version(drift_server, records) -> None:  # noqa: ANN001
    server, repo = drift_server
    names, x = records
    post(server, names, x[:5], "ward-reload")
    shutil.copytree(repo / "mimic-vitals" / "1", repo / "mimic-vitals" / "2")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        assert c.post("/v1/repository/reload").status_code == 200
        status = c.get("/v1/models/mimic-vitals/drift").json()
    assert status["version"] == "2" and status["streams"] == []
    assert post(server, names, x[:5], "ward-reload")["drift"]["records"] == 5


def test_drift_off_leaves_responses_and_routes_without_it(records, tmp_path: Path) -> None:  # noqa: ANN001
    names, x = records
    repo = tmp_path / "repository"
    shutil.copytree(ROOT / "model_repository" / "mimic-vitals", repo / "mimic-vitals")
    with running_server(repo, tmp_path, FLOWSERVE_HTTP_WORKERS="0", FLOWSERVE_DRIFT="false") as s:
        out = post(s, names, x[:3], "ward-off")
        with httpx.Client(base_url=s.url) as c:
            r = c.get("/v1/models/mimic-vitals/drift")
            metrics = c.get("/metrics").text
    assert "drift" not in out and r.status_code == 404 and "FLOWSERVE_DRIFT" in r.json()["error"]
    assert "flowserve_drift_statistic" not in metrics
