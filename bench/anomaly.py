"""Anomaly detection on a generated MIMIC-style test cohort: our flows vs IsolationForest and Mahalanobis.

For vitals (17 variables per patient-hour) and PLETH/ABP windows (2 × 1024):

1. Train the flow (``configs/mimic_vitals.yaml``, ``configs/mimic_waveform.yaml``) unless an
   artifact is given; the baselines fit the same training records (imputed vitals; globally scaled
   windows, flattened): scikit-learn's IsolationForest and a Gaussian with Ledoit-Wolf covariance
   (Mahalanobis distance).
2. A fresh cohort (new seed, new patients): normal records are negatives; anomalies of each kind
   are planted into copies of normal records (vitals after imputation, so no anomaly leaks into a
   neighbouring hour). AUROC and AUPRC per kind, all methods on the same rows.
3. Realised false-positive rate on another fresh normal cohort at the 1% target (conformal
   threshold from the artifact's calibration), for the NLL and the typicality statistic. Fresh
   windows come from 1,000 patients (two each): a threshold is a population quantile, and
   windows of one patient are not independent of each other.
4. Attribution (of the model's default statistic, as the route computes it): the share of
   single-feature vitals anomalies (unit errors, implausible values) whose planted feature ranks
   first, and of waveform anomalies whose top segment overlaps the planted one.

Usage: ``python bench/anomaly.py [--minutes 4] [--vitals-artifact DIR] [--waveform-artifact DIR]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.anomaly import STATISTICS  # noqa: E402


def trained(config: str, artifact_dir: str | None, minutes: float, tmp: Path) -> Path:
    if artifact_dir:
        return Path(artifact_dir)
    from models.train import load_config, train

    cfg = load_config(ROOT / "configs" / config)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_minutes": minutes})})
    out = tmp / config.removesuffix(".yaml")
    m = train(cfg, out, progress=False)
    print(f"{config}: trained {m['steps']} steps, test NLL {m['test_nll_nats']:.2f} nats, {m['parameters']:,} parameters")
    return out / "artifact"


def nll(model, x: np.ndarray, batch: int = 2048) -> np.ndarray:  # noqa: ANN001
    """NLL (nats) as the anomaly route computes it (discrete features at their bin midpoints)."""
    import torch

    from models.anomaly import scoring_noise

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
            out.append(-model.log_prob(xb, scoring_noise(model, len(xb))).double().numpy())
    return np.concatenate(out)


def baselines(train_x: np.ndarray, test_x: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.covariance import LedoitWolf
    from sklearn.ensemble import IsolationForest

    a, b = train_x.reshape(len(train_x), -1), test_x.reshape(len(test_x), -1)
    iso = IsolationForest(n_estimators=200, random_state=0).fit(a)
    lw = LedoitWolf().fit(a)
    return {"IsolationForest": -iso.score_samples(b), "Mahalanobis": lw.mahalanobis(b)}


def table(title: str, scores: dict[str, np.ndarray], kinds: np.ndarray) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    methods = list(scores)
    print(f"\n### {title}\n")
    print("| kind | n | " + " | ".join(f"{m} AUROC" for m in methods) + " | " + " | ".join(f"{m} AUPRC" for m in methods) + " |")
    print("|---|---|" + "---|" * (2 * len(methods)))
    normal = kinds == "normal"
    for kind in sorted(set(kinds) - {"normal"}):
        rows = normal | (kinds == kind)
        y = (kinds[rows] == kind).astype(int)
        au = [roc_auc_score(y, scores[m][rows]) for m in methods]
        ap = [average_precision_score(y, scores[m][rows]) for m in methods]
        print(f"| {kind} | {int(y.sum())} | " + " | ".join(f"{v:.3f}" for v in au) + " | " + " | ".join(f"{v:.3f}" for v in ap) + " |")


def statistics(scorer) -> list[str]:  # noqa: ANN001
    return [st for st in STATISTICS if st != "conditional" or scorer.atoms is not None]


def realised_fpr(model, scorer, fresh: np.ndarray, patients: int) -> str:  # noqa: ANN001
    s = nll(model, fresh)
    parts = [f"{st}: {100 * np.mean(scorer.p_values(s, st, fresh) <= 0.01):.2f}%" for st in statistics(scorer)]
    return (f"realised FPR at the 1% target on {len(fresh)} fresh normal records of {patients} patients "
            f"(calibration: {scorer.n} records; the model's default statistic: {scorer.default}): " + ", ".join(parts))


def vitals(art: Path, rng: np.random.Generator) -> None:
    from models import artifact
    from models.anomaly import AnomalyScorer
    from models.attribution import attribute
    from models.data import load_dataset
    from models.data.cohort import generate_vitals, plant_vital_anomaly
    from models.data.mimic import impute

    model = artifact.load(art).eval()
    scorer = AnomalyScorer(model.manifest.calibration)
    train_x = load_dataset("mimic-vitals").split("train")
    c = generate_vitals(120, 48, seed=101)
    x = impute(c.values, c.patient).values
    n_anom = len(x) // 10
    rows = rng.choice(len(x), n_anom, replace=False)
    anom = x[rows].copy()
    kinds, feats = [], []
    for i in range(n_anom):
        k, f = plant_vital_anomaly(anom[i], rng, ["hypotension", "unit_error", "implausible"][i % 3])
        kinds.append(k)
        feats.append(f)
    test_x = np.concatenate([x, anom]).astype(np.float32)
    labels = np.array(["normal"] * len(x) + kinds)
    flow = nll(model, test_x)
    scores = {**{f"flow ({st})": scorer.statistic(flow, st, test_x) for st in statistics(scorer)}, **baselines(train_x, test_x)}
    table(f"Vitals: {len(x)} normal patient-hours, {n_anom} anomalies", scores, labels)
    f = generate_vitals(120, 48, seed=202)
    fresh = impute(f.values, f.patient).values
    print("\n" + realised_fpr(model, scorer, fresh.astype(np.float32), 120))

    ref = np.asarray(model.manifest.calibration["reference"])

    def score(rows: np.ndarray, nz: np.ndarray | None) -> np.ndarray:  # nll() scores at the bin midpoints, as the route
        return scorer.statistic(nll(model, rows), x=rows)

    a = attribute(score, anom.astype(np.float32), None, ref)
    top = a.argmax(1)
    feats = np.array(feats)
    kinds = np.array(kinds)
    single = np.isin(kinds, ["unit_error", "implausible"])
    from models.data.mimic_schema import INDEX

    bp = [INDEX[k] for k in ("Systolic blood pressure", "Diastolic blood pressure", "Mean blood pressure")]
    print(f"attribution: planted feature ranked first in {100 * np.mean(top[single] == feats[single]):.1f}% of "
          f"{single.sum()} single-feature anomalies (unit_error {100 * np.mean(top[kinds == 'unit_error'] == feats[kinds == 'unit_error']):.1f}%, "
          f"implausible {100 * np.mean(top[kinds == 'implausible'] == feats[kinds == 'implausible']):.1f}%); "
          f"hypotension: a blood pressure ranked first in {100 * np.mean(np.isin(top[kinds == 'hypotension'], bp)):.1f}%")


def waveforms(art: Path, rng: np.random.Generator) -> None:
    from models import artifact
    from models.anomaly import AnomalyScorer
    from models.attribution import attribute, segment_bounds
    from models.data import load_dataset
    from models.data.cohort import generate_waveforms
    from models.data.mimic import scale_windows

    model = artifact.load(art).eval()
    scorer = AnomalyScorer(model.manifest.calibration)
    train_x = load_dataset("mimic-waveform").split("train")
    c = generate_waveforms(300, 4, seed=303, anomaly_fraction=0.25)
    test_x = scale_windows(c.windows, "global")
    flow = nll(model, test_x)
    scores = {**{f"flow ({st})": scorer.statistic(flow, st) for st in statistics(scorer)}, **baselines(train_x, test_x)}
    table(f"Waveforms: {int((c.kind == 'normal').sum())} normal windows, {int((c.kind != 'normal').sum())} anomalies", scores, c.kind)
    fresh = scale_windows(generate_waveforms(1000, 2, seed=404).windows, "global")
    print("\n" + realised_fpr(model, scorer, fresh, 1000))

    def score(rows: np.ndarray, nz: np.ndarray | None) -> np.ndarray:  # the model's default statistic, as the route explains
        return scorer.statistic(nll(model, rows))

    local = np.flatnonzero(np.isin(c.kind, ["flatline", "motion", "ectopic"]))
    a = attribute(score, test_x[local], None, segments=16)
    bounds = segment_bounds(test_x.shape[-1], 16)
    hits = [bounds[j][0] < c.segment[i, 1] and bounds[j][1] > c.segment[i, 0] for i, j in zip(local, a.argmax(1))]
    per_kind = {k: 100 * np.mean([h for h, i in zip(hits, local) if c.kind[i] == k]) for k in ("flatline", "motion", "ectopic")}
    print(f"attribution: top segment overlaps the planted one in {100 * np.mean(hits):.1f}% of {len(local)} localised anomalies ("
          + ", ".join(f"{k} {v:.1f}%" for k, v in per_kind.items()) + ")")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per flow when no artifact is given")
    ap.add_argument("--vitals-artifact")
    ap.add_argument("--waveform-artifact")
    ap.add_argument("--only", choices=["vitals", "waveforms"])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "waveforms":
            vitals(trained("mimic_vitals.yaml", args.vitals_artifact, args.minutes, Path(tmp)), rng)
        if args.only != "vitals":
            waveforms(trained("mimic_waveform.yaml", args.waveform_artifact, args.minutes, Path(tmp)), rng)


if __name__ == "__main__":
    main()
