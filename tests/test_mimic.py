"""MIMIC-style records: the generated cohort, and loaders for the real formats (WFDB, benchmark
timeseries CSV, flat CSV, waveform CSV exports), with clear errors on malformed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from models.cli import app
from models.data import load_dataset
from models.data.cohort import generate_vitals, generate_waveforms
from models.data.mimic import (
    hot_deck,
    impute,
    read_timeseries_csv,
    read_vitals,
    read_waveform_csv,
    read_waveforms,
    read_wfdb,
    scale_windows,
    windows_from_signal,
    write_timeseries_csv,
    write_wfdb,
)
from models.data.mimic_schema import INDEX, VITAL_NAMES, VITALS, WINDOW
from models.errors import DataError
from tests.server import Server

BENCHMARK_EPISODE = """Hours,Capillary refill rate,Diastolic blood pressure,Fraction inspired oxygen,Glascow coma scale eye opening,Glascow coma scale motor response,Glascow coma scale total,Glascow coma scale verbal response,Glucose,Heart Rate,Height,Mean blood pressure,Oxygen saturation,Respiratory rate,Systolic blood pressure,Temperature,Weight,pH
0.06,,61.0,,4 Spontaneously,6 Obeys Commands,15,5 Oriented,,84,170,77.0,98.0,18,122.0,36.8,79.4,
0.55,,,,,,,,131,86,,,,,,,,7.38
1.20,0.0,58.0,0.4,To Pain,Localizes Pain,,No Response-ETT,,92,,74.0,96,22,118,,,
"""


def test_generator_is_deterministic_and_physiological() -> None:
    a, b = generate_vitals(30, 24, seed=3), generate_vitals(30, 24, seed=3)
    np.testing.assert_array_equal(a.values, b.values)
    v = a.values
    sbp, dbp, mbp = (v[:, INDEX[k]] for k in ("Systolic blood pressure", "Diastolic blood pressure", "Mean blood pressure"))
    ok = np.isfinite(sbp) & np.isfinite(dbp) & np.isfinite(mbp)
    assert (sbp[ok] > dbp[ok]).all() and np.abs(mbp[ok] - (dbp[ok] + (sbp[ok] - dbp[ok]) / 3)).mean() < 3
    gcs = v[:, [INDEX[k] for k in VITAL_NAMES if k.startswith("Glascow")]]
    seen = np.isfinite(gcs).all(1)
    eye, motor, total, verbal = gcs[seen].T
    np.testing.assert_array_equal(eye + motor + verbal, total)
    missing = np.isnan(v).mean(0)
    assert missing[INDEX["Heart Rate"]] < 0.1 and missing[INDEX["pH"]] > 0.8  # MIMIC-like missingness
    for j, var in enumerate(VITALS):
        col = v[:, j][np.isfinite(v[:, j])]
        assert (col >= var.low).all() and (col <= var.high).all(), var.name


def test_generated_anomalies_are_labelled_with_their_feature() -> None:
    c = generate_vitals(50, 24, seed=1, anomaly_fraction=0.1)
    kinds = set(c.kind) - {"normal"}
    assert kinds == {"hypotension", "unit_error", "implausible"}
    planted = c.feature[c.kind != "normal"]
    assert (planted >= 0).all()
    assert np.isfinite(c.values[c.kind != "normal", :][np.arange((c.kind != "normal").sum()), planted]).all()


def test_waveforms_have_beats_notches_and_labelled_segments() -> None:
    w = generate_waveforms(6, 4, seed=0)
    assert w.windows.shape == (24, 2, WINDOW) and (w.kind == "normal").all()
    abp = w.windows[:, 1]
    assert 40 < abp.min() and abp.max() < 200  # mmHg
    pleth = w.windows[0, 0]
    # heart rate 50..140 bpm: 8.2 s windows hold 6..20 systolic peaks
    peaks = np.flatnonzero((pleth[1:-1] > pleth[:-2]) & (pleth[1:-1] >= pleth[2:]) & (pleth[1:-1] > np.percentile(pleth, 80)))
    assert 6 <= len(peaks) <= 40
    a = generate_waveforms(10, 4, seed=1, anomaly_fraction=0.5)
    bad = a.kind != "normal"
    assert bad.any() and (a.segment[bad, 0] >= 0).all() and (a.segment[~bad] == -1).all()
    flat = np.flatnonzero(a.kind == "flatline")
    if len(flat):
        s, e = a.segment[flat[0]]
        assert np.std(a.windows[flat[0], 0, s:e]) < 0.01


def test_benchmark_timeseries_csv_with_gcs_text(tmp_path: Path) -> None:
    path = tmp_path / "3_episode1_timeseries.csv"
    path.write_text(BENCHMARK_EPISODE)
    hours, values = read_timeseries_csv(path)
    assert hours.tolist() == pytest.approx([0.06, 0.55, 1.2])
    assert values[0, INDEX["Glascow coma scale eye opening"]] == 4 and values[2, INDEX["Glascow coma scale eye opening"]] == 2
    assert values[2, INDEX["Glascow coma scale motor response"]] == 5 and values[2, INDEX["Glascow coma scale verbal response"]] == 1
    assert np.isnan(values[0, INDEX["Glucose"]]) and values[1, INDEX["Glucose"]] == 131
    records, episode = read_vitals(tmp_path)
    assert records.shape == (2, 17)  # two patient-hours
    assert records[0, INDEX["Glucose"]] == 131 and records[0, INDEX["pH"]] == pytest.approx(7.38)
    imputed, mask, unseen = impute(records, episode)
    assert imputed[1, INDEX["Glucose"]] == 131 and mask[1, INDEX["Glucose"]]  # carried forward
    assert imputed[0, INDEX["Capillary refill rate"]] == 0 and mask[0, INDEX["Capillary refill rate"]]
    assert not mask[0, INDEX["Heart Rate"]] and np.isfinite(imputed).all()
    assert unseen[0, INDEX["Capillary refill rate"]] and not unseen[1, INDEX["Glucose"]] and not unseen[0, INDEX["Heart Rate"]]


def test_hot_deck_fills_only_unseen_continuous_cells_from_known_values() -> None:
    c = generate_vitals(30, 12, seed=4)
    filled = impute(c.values, c.patient)
    x = hot_deck(filled.values, filled.unseen, np.random.default_rng(0))
    keep = ~filled.unseen
    np.testing.assert_array_equal(x[keep], filled.values[keep])
    for j, var in enumerate(VITALS):
        rows = filled.unseen[:, j]
        if var.discrete:
            np.testing.assert_array_equal(x[rows, j], var.normal)
        elif rows.any():
            assert np.isin(x[rows, j], filled.values[~rows, j]).all()
            assert len(np.unique(x[rows, j])) > 1  # no point mass left at the normal value


def test_generated_episodes_roundtrip_through_the_benchmark_format(tmp_path: Path) -> None:
    c = generate_vitals(2, 6, seed=0)
    rows = c.patient == 0
    write_timeseries_csv(tmp_path / "0_episode1_timeseries.csv", c.hour[rows].astype(float), c.values[rows])
    hours, values = read_timeseries_csv(tmp_path / "0_episode1_timeseries.csv")
    np.testing.assert_allclose(values, c.values[rows], rtol=1e-4)


@pytest.mark.parametrize(
    "content, message",
    [
        ("Hours,Heart Rate\n0.5,80\n", "missing columns"),
        (BENCHMARK_EPISODE.replace("4 Spontaneously", "wide awake"), "wide awake"),
        (BENCHMARK_EPISODE.replace(",84,", ",eighty,"), "line 2"),
        (BENCHMARK_EPISODE.replace("0.55,,,", "0.55,,"), "fields"),
    ],
)
def test_malformed_benchmark_files_are_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "1_episode1_timeseries.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_timeseries_csv(path)


def test_wfdb_record_written_with_wfdb_is_read_into_windows(tmp_path: Path) -> None:
    w = generate_waveforms(1, 3, seed=0).windows
    signal = w.transpose(0, 2, 1).reshape(-1, 2)
    write_wfdb(tmp_path, "p00001", signal)
    assert (tmp_path / "p00001.hea").is_file() and (tmp_path / "p00001.dat").is_file()
    back = read_wfdb(tmp_path / "p00001.hea")
    np.testing.assert_allclose(back, signal, atol=0.01)  # 16-bit ADC quantisation
    windows, record = read_waveforms(tmp_path)
    assert windows.shape == (3, 2, WINDOW) and record.tolist() == [0, 0, 0]


def test_wfdb_errors(tmp_path: Path) -> None:
    import wfdb

    sig = np.random.default_rng(0).normal(size=(2048, 2))
    wfdb.wrsamp("ecg", fs=125, units=["mV", "mV"], sig_name=["II", "V"], p_signal=sig, fmt=["16", "16"], write_dir=str(tmp_path))
    with pytest.raises(DataError, match="no PLETH or ABP channel"):
        read_wfdb(tmp_path / "ecg.hea")
    wfdb.wrsamp("fast", fs=250, units=["NU", "mmHg"], sig_name=["PLETH", "ABP"], p_signal=sig, fmt=["16", "16"], write_dir=str(tmp_path))
    with pytest.raises(DataError, match="250"):
        read_wfdb(tmp_path / "fast.hea")
    (tmp_path / "broken.hea").write_text("this is not a header\n")
    with pytest.raises(DataError, match="broken"):
        read_wfdb(tmp_path / "broken.hea")
    (tmp_path / "nodat.hea").write_text("nodat 2 125 2048\nnodat.dat 16 100 16 0 0 0 0 PLETH\nnodat.dat 16 100 16 0 0 0 0 ABP\n")
    with pytest.raises(DataError, match="nodat"):
        read_wfdb(tmp_path / "nodat.hea")


def test_waveform_csv_export_with_units_row_and_gaps(tmp_path: Path) -> None:
    n = 2 * WINDOW + 10
    t = np.arange(n) / 125
    lines = ["'Elapsed time','ABP','PLETH'", "'seconds','mmHg','NU'"]
    for k in range(n):
        pleth = "-" if k == WINDOW + 5 else f"{0.5 + 0.4 * np.sin(7 * t[k]):.4f}"
        lines.append(f"{t[k]:.3f},{90 + 20 * np.sin(7 * t[k]):.2f},{pleth}")
    path = tmp_path / "export.csv"
    path.write_text("\n".join(lines) + "\n")
    sig = read_waveform_csv(path)
    assert sig.shape == (n, 2) and sig[0, 0] == pytest.approx(0.5) and sig[0, 1] == pytest.approx(90)  # PLETH, ABP order
    assert windows_from_signal(sig).shape == (1, 2, WINDOW)  # the window with the gap is dropped
    with pytest.raises(DataError, match="only 1 complete"):
        read_waveforms(path)
    path.write_text("'Elapsed time','PLETH'\n0,1\n")
    with pytest.raises(DataError, match="ABP"):
        read_waveform_csv(path)


def test_scalings() -> None:
    w = generate_waveforms(2, 2, seed=0).windows
    g = scale_windows(w, "global")
    assert abs(float(g[:, 1].mean())) < 1.0 and abs(float(g[:, 0].mean())) < 1.0
    m = scale_windows(w, "minmax")
    np.testing.assert_allclose(m.min(-1), 0, atol=1e-6)
    np.testing.assert_allclose(m.max(-1), 1, atol=1e-6)


def test_dataset_specs_load_generated_and_exported_cohorts(tmp_path: Path) -> None:
    vit = load_dataset("mimic-vitals")
    assert vit.spec.kind == "record" and vit.spec.shape == (17,) and vit.spec.feature_names == list(VITAL_NAMES)
    assert np.isfinite(vit.split("train")).all()
    wav = load_dataset("mimic-waveform")
    assert wav.spec.shape == (2, WINDOW) and wav.spec.feature_names == ["PLETH", "ABP"]
    result = CliRunner().invoke(app, ["generate-cohort", str(tmp_path / "c"), "--patients", "8", "--hours", "6", "--windows-per-patient", "2"])
    assert result.exit_code == 0, result.output
    assert "synthetic" in result.output and (tmp_path / "c" / "SYNTHETIC.txt").is_file()
    from_files = load_dataset(f"mimic-vitals:{tmp_path / 'c' / 'vitals' / 'episodes'}")
    assert sum(len(from_files.split(s)) for s in ("train", "val", "test")) == 8 * 6
    assert all(len(from_files.split(s)) % 6 == 0 for s in ("train", "val", "test"))  # whole patients per split
    flat = load_dataset(f"mimic-vitals:{tmp_path / 'c' / 'vitals' / 'test_records.csv'}")
    assert flat.spec.shape == (17,)
    waves = load_dataset(f"mimic-waveform-minmax:{tmp_path / 'c' / 'waveforms' / 'train'}")
    assert sum(len(waves.split(s)) for s in ("train", "val", "test")) == 16
    assert float(waves.split("train").max()) <= 1.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*_timeseries.csv"):
        load_dataset(f"mimic-vitals:{tmp_path / 'empty'}")


@pytest.fixture(scope="module")
def mimic_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny vitals and waveform flows trained on the generated cohort, as a model repository."""
    from models.training.loop import TrainConfig, train

    tmp = tmp_path_factory.mktemp("mimic")
    runs = {
        "vitals": {"data": "mimic-vitals", "model": {"name": "vector", "steps": 2, "hidden": 16},
                   "train": {"steps": 60, "batch_size": 128, "eval_every": 60}},
        "waves": {"data": "mimic-waveform", "anomaly_statistic": "typicality",
                  "model": {"name": "waveform", "levels": 2, "steps": 1, "hidden": 8, "butterfly_levels": [4, 3], "whiten": True},
                  "train": {"steps": 30, "batch_size": 32, "eval_every": 30, "init_batch": 4096}},
    }
    for name, cfg in runs.items():
        train(TrainConfig.model_validate(cfg), tmp / name, progress=False)
        (tmp / "repo" / name).mkdir(parents=True)
        (tmp / name / "artifact").rename(tmp / "repo" / name / "1")
    return tmp / "repo"


@pytest.fixture(scope="module")
def mimic_server(mimic_repository: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """One real server over the mimic repository for the HTTP tests of this module."""
    from tests.server import running_server

    with running_server(mimic_repository, tmp_path_factory.mktemp("mimic_srv")) as s:
        yield s


def test_vitals_model_dequantizes_gcs_and_samples_integers(mimic_repository: Path) -> None:
    import torch

    from models import load

    model = load(str(mimic_repository / "vitals" / "1"))
    k = [INDEX[n] for n in VITAL_NAMES if n.startswith("Glascow")] + [INDEX["Capillary refill rate"]]
    assert sorted(model.spec.discrete_features) == sorted(k)
    cal = model.manifest.calibration
    assert len(cal.fill) == 17 and np.array(cal.reference).shape == (17, 9)
    x = model.sample(32, 0.8, torch.Generator().manual_seed(0)).numpy()
    np.testing.assert_array_equal(x[:, k], np.round(x[:, k]))


def test_anomaly_route_for_vitals_and_waveforms(mimic_server: Server) -> None:
    c = generate_vitals(4, 3, seed=9)
    x = impute(c.values, c.patient).values
    records = [dict(zip(VITAL_NAMES, map(float, row))) for row in x[:4]]
    records[1]["Temperature"] = 98.6  # °F: a unit error
    del records[2]["pH"]
    records[3]["Weight"] = None
    w = generate_waveforms(2, 2, seed=5, anomaly_fraction=0.5)
    windows = scale_windows(w.windows, "global")
    with mimic_server.client() as client:
        r = client.post("/v1/models/vitals/anomaly", json={"records": records, "explain": "all", "top": 3})
        assert r.status_code == 200, r.text
        res = r.json()["results"]
        assert res[2]["absent"] == ["pH"] and res[3]["absent"] == ["Weight"] and res[0]["absent"] == []
        assert res[1]["nll"] > res[0]["nll"] and res[1]["attribution"][0]["feature"] == "Temperature"
        assert all(len(x["attribution"]) == 3 for x in res)
        assert all(a.get("feature") != "pH" and "pH" not in a.get("features", []) for a in res[2]["attribution"])
        # a record with absent features is compared with calibration records of its own pattern
        assert res[0]["calibration_n"] == r.json()["calibration"]["n"] and res[2]["calibration_n"] <= 1000
        half = {**records[0], "Glascow coma scale eye opening": 2.5}  # the Glasgow scale has integer levels only
        bad = client.post("/v1/models/vitals/anomaly", json={"records": [records[0], half]})
        assert bad.status_code == 400 and bad.json()["error"].startswith("records[1].Glascow coma scale eye opening: value 2.5")
        bad = client.post("/v1/models/vitals/score", json={"instances": [records[2]]})  # scoring takes complete records
        assert bad.status_code == 400 and "missing feature(s) ['pH']" in bad.json()["error"] and "anomaly route" in bad.json()["error"]
        for empty in ({}, {"Heart Rate": None}):  # nothing measured: nothing to score or to explain
            bad = client.post("/v1/models/vitals/anomaly", json={"records": [records[0], empty], "explain": "all"})
            assert bad.status_code == 400 and bad.json()["error"].startswith("records[1]: no features"), bad.text
        r = client.post("/v1/models/waves/anomaly", json={"records": windows.tolist(), "explain": "all", "segments": 8})
        assert r.status_code == 200, r.text
        assert r.json()["statistic"] == "typicality"  # the waveform model's default (set at training)
        res = r.json()["results"]
        assert len(res) == 4 and all(0 < x["p_value"] <= 1 and "imputed" not in x and "absent" not in x for x in res)
        seg = res[0]["attribution"][0]
        assert set(seg) == {"segment", "start", "end", "nats"} and 0 <= seg["start"] < seg["end"] <= WINDOW
        bad = client.post("/v1/models/waves/anomaly", json={"records": windows[:, :, :100].tolist()})
        assert bad.status_code == 400 and "shape" in bad.json()["error"]
        bad = client.post("/v1/models/waves/anomaly", json={"records": windows.tolist(), "statistic": "conditional"})
        assert bad.status_code == 400 and "record model" in bad.json()["error"]


def test_sampled_vitals_are_valid_records(mimic_repository: Path, mimic_server: Server) -> None:
    """Samples respect the schema's ranges and integer levels, and the Glasgow total is the sum of its components;
    HTTP and models.load(...).sample give the same records for a seed."""
    from models import load
    from models.sampling import valid

    model = load(str(mimic_repository / "vitals" / "1"))
    raw = model.sample(500, z=torch_latent(500, model.spec.dims))  # the flow's inverse as it is
    assert not valid(model.spec, raw.numpy()).all()  # an undertrained flow leaves the ranges: rejection has work to do
    x = model.sample(500, seed=11).numpy()
    assert valid(model.spec, x).all()
    gcs = [INDEX[f"Glascow coma scale {p}"] for p in ("eye opening", "motor response", "verbal response")]
    assert (x[:, INDEX["Glascow coma scale total"]] == x[:, gcs].sum(1)).all()
    assert (x[:, model.spec.discrete_features] == np.floor(x[:, model.spec.discrete_features])).all()
    with mimic_server.client() as c:
        r = c.post("/v1/models/vitals/sample", json={"n": 500, "seed": 11})
        assert r.status_code == 200, r.text
        assert np.allclose(np.array(r.json()["samples"]), x, atol=1e-4)
        hot = c.post("/v1/models/vitals/sample", json={"n": 4, "temperature": 10, "seed": 1})
        assert hot.status_code == 400 and "temperature" in hot.json()["error"]


def torch_latent(n: int, d: int):  # noqa: ANN201
    import torch

    return torch.from_numpy(np.random.default_rng(0).standard_normal((n, d)).astype(np.float32))


def test_waveform_routes_draw_png_plots(mimic_server: Server) -> None:
    import io

    from PIL import Image

    w = generate_waveforms(2, 2, seed=5, anomaly_fraction=0.5)
    windows = scale_windows(w.windows, "global")
    with mimic_server.client() as c:
        png = {"accept": "image/png"}
        r = c.post("/v1/models/waves/sample", json={"n": 3, "seed": 2}, headers=png)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        img.load()
        assert img.format == "PNG" and img.size[0] == 800 and img.size[1] > 3 * 2 * 100  # 3 windows × 2 channels
        r = c.post("/v1/models/waves/anomaly", json={"records": windows.tolist(), "explain": "all", "segments": 8}, headers=png)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(r.content))
        img.load()
        assert img.size[0] == 800 and 10_000 < len(r.content) < 2_000_000
        many = c.post("/v1/models/waves/sample", json={"n": 17}, headers=png)
        assert many.status_code == 400 and "at most 16" in many.json()["error"]
        rec = c.post("/v1/models/vitals/sample", json={"n": 2}, headers=png)
        assert rec.status_code == 400 and "image or waveform" in rec.json()["error"]


VITAL_VALUE = st.one_of(st.none(), st.integers(-5, 20), st.floats(-1e3, 1e3, allow_nan=False),
                        st.sampled_from([0.21, 7.4, 1e30, -3e38, 1e-30]))


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(st.sampled_from(VITAL_NAMES), VITAL_VALUE, max_size=17), min_size=1, max_size=3),
       st.sampled_from(["all", "anomalies", "none"]), st.sampled_from(["marginal", "median"]),
       st.sampled_from(["nll", "typicality", "conditional"]), st.integers(1, 20))
def test_anomaly_route_answers_any_records_with_a_score_or_a_400(mimic_server: Server, records: list, explain: str,
                                                                   missing: str, statistic: str, top: int) -> None:
    """Any mix of present, null and absent features, in or out of range: finite results or a 400 that says why."""
    with mimic_server.client() as c:
        r = c.post("/v1/models/vitals/anomaly", json={"records": records, "explain": explain, "missing": missing,
                                                        "statistic": statistic, "top": top})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"].startswith("records"), r.text
        return
    res = r.json()["results"]
    assert len(res) == len(records)
    for rec, out in zip(records, res):
        assert np.isfinite(out["nll"]) and 0 < out["p_value"] <= 1
        sent = {k for k, v in rec.items() if v is not None}
        assert set(out["absent"]) == set(VITAL_NAMES) - sent
        for a in out.get("attribution") or []:  # only what was sent is blamed
            assert set([a["feature"]] if "feature" in a else a["features"]) <= sent
