"""Drift alarms from the served density (:mod:`models.anomaly.drift`) against alibi-detect's online detectors
and the anomaly route's per-record flags, on the same streams at the same ERT.

Streams. Each scenario is a pool of records from patients (or rows) that no model saw in training
or calibration; a stream draws records from its pool independently (a ward's feed with its patients
interleaved). A stream is drifted from its first record, so the detection delay is the record at
which a detector first alarms; without drift that record is the run length to a false alarm.

Scenarios on the generated MIMIC-style cohort (400 fresh patients × 48 hours, imputed as the route
receives them), scored by the bundled ``mimic-vitals`` flow with its default statistic:

* ``none``: no drift;
* ``spo2_low``: the SpO2 sensor reads 2 points low;
* ``temp_f``: 20% of records carry temperature in °F;
* ``sicker``: a ward 30% sicker (every patient's severity × 1.3, :func:`models.data.cohort.generate_vitals`);
* ``hr_stuck``: the heart rate stuck at one value (the pool's median) on every record.

One real data set: scikit-learn's optdigits (handwritten digits 1–9 as the normal class, as in
``bench/tabular.py``). The tabular flow (``--preset tabular``) trains on half of the normal records
and is recalibrated (``flowserve calibrate``) on a quarter; the streams draw from the last quarter.
``digits_none``: as they are; ``digits_38``: a shift in what is written, half of the stream's records
are 3s and 8s, the rest as before; ``digits_faint``: a scanner with 25% less gain, every pixel count
× 0.75, rounded.

Detectors, each configured for the same ERT:

* ``flow SR``: the mixture Shiryaev–Roberts detector on the route's conformal p-values, as served
  (``FLOWSERVE_DRIFT_*`` defaults but the ERT);
* ``flow SR, no correction``: the same without the correction for the calibration set in use
  (``confidence`` 0.5, records counted as independent): valid on average over calibration sets
  only, as a uniform-p-value martingale would be; what the guarantee costs;
* ``per-record flags``: the first record the anomaly route flags at ``target_fpr = 1/ERT``;
* alibi-detect's ``MMDDriftOnline``, ``LSDDDriftOnline`` (window ``--window``) and ``CVMDriftOnline``
  on the records (standardised with the training records' mean and sd; CVM is per feature), with the
  flow's calibration records as their reference. alibi-detect needs numpy < 2, so it runs in its own
  environment (``--alibi-python``; ``make alibi-env`` makes one); without it the table has our columns only.

Reported per scenario and detector: the mean first-alarm record over ``--runs`` streams ± its standard
error (streams that never alarm within ``--length`` records count as ``--length + 1``, and how many
did is shown). Then the cost: the anomaly route's rows/s with drift tracking on and off
(``FLOWSERVE_DRIFT``), two servers measured in interleaved rounds.

Usage: ``python bench/drift.py [--ert 200] [--runs 200] [--alibi-runs 30] [--alibi-python .alibi-env/bin/python]
[--only vitals,digits,cost] [--cost-seconds 10 --cost-rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def vitals_pools(art: Path) -> tuple[dict[str, np.ndarray], np.ndarray, object]:
    """Record pools per scenario, the reference records (the flow's calibration split) and the scorer's inputs."""
    from models.data import load_dataset
    from models.data.cohort import generate_vitals
    from models.data.mimic import impute
    from models.data.mimic_schema import INDEX

    def cohort(scale: float = 1.0) -> np.ndarray:
        c = generate_vitals(400, 48, seed=303, severity_scale=scale)
        return impute(c.values, c.patient).values.astype(np.float32)

    base = cohort()
    rng = np.random.default_rng(7)
    spo2 = base.copy()
    spo2[:, INDEX["Oxygen saturation"]] -= 2
    temp = base.copy()
    rows = rng.random(len(temp)) < 0.2
    temp[rows, INDEX["Temperature"]] = temp[rows, INDEX["Temperature"]] * 9 / 5 + 32
    stuck = base.copy()
    stuck[:, INDEX["Heart Rate"]] = np.median(base[:, INDEX["Heart Rate"]])
    pools = {"none": base, "spo2_low": spo2, "temp_f": temp, "sicker": cohort(1.3), "hr_stuck": stuck}
    ds = load_dataset("mimic-vitals")
    return pools, ds.split("val").astype(np.float32), ds.split("train")


def digits_pools(tmp: Path) -> tuple[Path, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Train and calibrate the tabular flow on optdigits; the held-out pool and per-scenario draw weights."""
    from sklearn.datasets import load_digits

    from bench.tabular import write_csv
    from models import presets
    from models.anomaly.calibration import recalibrate
    from models.training.loop import load_config, train

    d = load_digits()
    keep = d.target != 0
    x, y = d.data[keep].astype(np.float32), d.target[keep]
    order = np.random.default_rng(0).permutation(len(x))
    n_tr, n_ca = len(x) // 2, len(x) // 4
    tr, ca, te = order[:n_tr], order[n_tr : n_tr + n_ca], order[n_tr + n_ca :]
    names = [f"pixel_{i}" for i in range(x.shape[1])]
    cfg = load_config(presets.path("tabular")).model_copy(update={"data": write_csv(tmp / "train.csv", names, x[tr]), "seed": 0})
    t0 = time.monotonic()
    train(cfg, tmp / "run", progress=False)
    art = tmp / "run" / "artifact"
    recalibrate(art, write_csv(tmp / "calibration.csv", names, x[ca]))
    print(f"optdigits: tabular flow trained on {len(tr)} records and recalibrated on {len(ca)} in {time.monotonic() - t0:.0f} s; "
          f"stream pool: {len(te)} held-out records")
    pool = x[te]
    shifted = np.isin(y[te], [3, 8])
    w_shift = np.where(shifted, 0.5 / shifted.sum(), 0.5 / (~shifted).sum())
    faint = np.round(pool * 0.75)  # a scanner with 25% less gain: every pixel count scaled, still integers 0..16
    weights = {"digits_none": np.full(len(te), 1 / len(te)), "digits_38": w_shift, "digits_faint": np.full(len(te), 1 / len(te))}
    return art, {"digits_none": pool, "digits_38": pool, "digits_faint": faint}, weights, x[ca], x[tr]


def p_values(art: Path, pools: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int, int]:
    """The anomaly route's p-values (the model's default statistic) of every pool record, the calibration size and
    its independent units (patients)."""
    from models.anomaly.scoring import AnomalyScorer, model_scorer
    from models.artifacts import store as artifact

    model = artifact.load(art).eval()
    scorer = AnomalyScorer(model.manifest.calibration)
    score = model_scorer(model)
    out = {}
    for name, pool in pools.items():
        nll = -score(pool, None)
        out[name] = scorer.p_values(nll, None, pool)
    return out, scorer.n, scorer.units


def ours(p: dict[str, np.ndarray], idx: dict[str, np.ndarray], n: int, units: int, ert: float) -> dict[str, dict[str, np.ndarray]]:
    from models.anomaly.drift import DriftConfig, DriftFamily, first_alarms

    family = DriftFamily(DriftConfig(ert=ert))
    loose = DriftFamily(DriftConfig(ert=ert, confidence=0.5))
    out: dict[str, dict[str, np.ndarray]] = {"flow SR": {}, "flow SR, no correction": {}, "per-record flags": {}}
    for sc, rows in idx.items():
        streams = p[sc][rows]
        out["flow SR"][sc] = first_alarms(family, streams, n, units)
        out["flow SR, no correction"][sc] = first_alarms(loose, streams, n, n)
        flagged = streams <= 1 / ert
        out["per-record flags"][sc] = np.where(flagged.any(1), flagged.argmax(1) + 1, streams.shape[1] + 1)
    return out


def alibi(python: str, ref: np.ndarray, train: np.ndarray, pools: dict[str, np.ndarray], idx: dict[str, np.ndarray],
          ert: float, window: int, tmp: Path) -> tuple[dict[str, dict[str, np.ndarray]], str]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    arrays = {"ref": (ref - mu) / sd, "ert": np.array(ert), "window": np.array(window), "bootstraps": np.array(max(2000, int(20 * ert)))}
    for sc, rows in idx.items():
        arrays[f"pool_{sc}"] = (pools[sc] - mu) / sd
        arrays[f"idx_{sc}"] = rows
    src, out = tmp / "alibi_in.npz", tmp / "alibi_out.json"
    np.savez(src, **arrays)
    subprocess.run([python, str(ROOT / "bench" / "alibi_online.py"), str(src), str(out)], check=True)
    res = json.loads(out.read_text())
    version = res.pop("alibi_detect")
    return {name: {sc: np.asarray(v) for sc, v in r["first_alarms"].items()} for name, r in res.items()}, version


def table(title: str, results: dict[str, dict[str, np.ndarray]], scenarios: list[str], length: int) -> None:
    print(f"\n### {title}\n")
    methods = list(results)
    print("| scenario | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for sc in scenarios:
        cells = []
        for m in methods:
            v = results[m].get(sc)
            if v is None:
                cells.append("")
                continue
            never = int((v > length).sum())
            cells.append(f"{v.mean():.1f} ± {v.std() / np.sqrt(len(v)):.1f}" + (f" ({never}/{len(v)} never)" if never else "") + f" [{len(v)}]")
        print(f"| {sc} | " + " | ".join(cells) + " |")


def streams(pools: dict[str, np.ndarray], runs: int, length: int, seed: int, weights: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {sc: rng.choice(len(pool), (runs, length), p=None if weights is None else weights[sc]) for sc, pool in pools.items()}


def cost(seconds: float, rounds: int, tmp: Path) -> None:
    """Anomaly-route rows/s with drift tracking on and off: two servers, interleaved rounds, 64 records per request."""
    import asyncio
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_anomaly", ROOT / "bench" / "anomaly.py")  # bench/ stays off sys.path
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    anomaly_load = module.anomaly_load
    from models.data.cohort import generate_vitals
    from models.data.mimic import impute
    from models.data.mimic_schema import VITAL_NAMES
    from tests.server import running_server

    c = generate_vitals(40, 48, seed=505)
    full = impute(c.values, c.patient).values
    bodies = [[dict(zip(VITAL_NAMES, map(float, r))) for r in full[i : i + 64]] for i in range(0, len(full) - 63, 64)]

    rates: dict[str, list[float]] = {"on": [], "off": []}
    with running_server(ROOT / "model_repository", tmp, FLOWSERVE_DRIFT="true") as on, \
            running_server(ROOT / "model_repository", tmp, FLOWSERVE_DRIFT="false") as off:
        for s in (on, off):
            asyncio.run(anomaly_load(s.url, bodies, seconds, stream=True))  # warm both (pattern-free, complete records)
        for _ in range(rounds):
            for key, s in (("on", on), ("off", off)):
                rates[key].append(asyncio.run(anomaly_load(s.url, bodies, seconds, stream=True))[0])
    on_r, off_r = np.array(rates["on"]), np.array(rates["off"])
    print(f"\n### Cost of drift tracking (bundled mimic-vitals, 64 complete records per request, 4 clients each on its own "
          f"stream, {rounds} interleaved rounds of {seconds:.0f} s)\n")
    print("| drift tracking | rows/s per round | mean |\n|---|---|---|")
    print(f"| on | {', '.join(f'{r:.0f}' for r in on_r)} | {on_r.mean():.0f} |")
    print(f"| off | {', '.join(f'{r:.0f}' for r in off_r)} | {off_r.mean():.0f} |")
    print(f"\non / off: {on_r.mean() / off_r.mean():.3f} (per round: {', '.join(f'{a / b:.3f}' for a, b in zip(on_r, off_r))})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ert", type=float, default=200)
    ap.add_argument("--runs", type=int, default=200, help="streams per scenario for the flow's detector and the flags")
    ap.add_argument("--alibi-runs", type=int, default=30, help="streams per scenario for alibi-detect (a subset of ours)")
    ap.add_argument("--length", type=int, default=0, help="records per stream (default 20 × ERT)")
    ap.add_argument("--window", type=int, default=20, help="alibi-detect's window size")
    ap.add_argument("--alibi-python", default=str(ROOT / ".alibi-env" / "bin" / "python"))
    ap.add_argument("--vitals-artifact", default=str(ROOT / "model_repository" / "mimic-vitals" / "1"))
    ap.add_argument("--only", default="vitals,digits,cost", help="parts to run: vitals, digits (the real data set), cost")
    ap.add_argument("--cost-seconds", type=float, default=10)
    ap.add_argument("--cost-rounds", type=int, default=3)
    args = ap.parse_args()
    length = args.length or int(20 * args.ert)
    has_alibi = Path(args.alibi_python).exists()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        t0 = time.monotonic()
        parts = set(args.only.split(","))
        print(f"\nERT {args.ert:g} records; streams of up to {length} records; alibi-detect "
              f"{'from ' + args.alibi_python if has_alibi else 'not run (no --alibi-python)'}, window {args.window}")
        if "vitals" in parts:
            pools, ref, train = vitals_pools(Path(args.vitals_artifact))
            p, n, units = p_values(Path(args.vitals_artifact), pools)
            idx = streams(pools, args.runs, length, seed=1)
            res = ours(p, idx, n, units, args.ert)
            if has_alibi:
                sub = {sc: v[: args.alibi_runs] for sc, v in idx.items()}
                a, version = alibi(args.alibi_python, ref, train, pools, sub, args.ert, args.window, tmp)
                res.update(a)
                print(f"alibi-detect {version}")
            table(f"Generated MIMIC-style vitals (calibration: {n} records of {units} patients): first-alarm record (none: run "
                  f"length to a false alarm; others: detection delay); {time.monotonic() - t0:.0f} s", res, list(pools), length)
        if "digits" in parts:
            art, dpools, weights, dref, dtrain = digits_pools(tmp)
            dp, dn, dunits = p_values(art, dpools)
            didx = streams(dpools, args.runs, length, seed=2, weights=weights)
            dres = ours(dp, didx, dn, dunits, args.ert)
            if has_alibi:
                sub = {sc: v[: args.alibi_runs] for sc, v in didx.items()}
                a, _ = alibi(args.alibi_python, dref, dtrain, dpools, sub, args.ert, args.window, tmp)
                dres.update(a)
            table(f"optdigits (real, 64 pixel counts; calibration n = {dn}): first-alarm record", dres, list(dpools), length)
        if "cost" in parts and args.cost_seconds > 0:
            cost(args.cost_seconds, args.cost_rounds, tmp)


if __name__ == "__main__":
    main()
