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
5. ``--only ceiling``: how often a reference density of the generated vitals (a Gaussian mixture fitted to 5× the
   flow's training patients) puts the blood-pressure group first for planted hypotension, beside the flow.

Usage: ``python bench/anomaly.py [--minutes 4] [--vitals-artifact DIR] [--waveform-artifact DIR] [--only PART]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.anomaly.marginal import DEFAULT_SAMPLES  # noqa: E402
from models.anomaly.missing import COLD_PATTERN_RECORDS  # noqa: E402
from models.anomaly.scoring import STATISTICS  # noqa: E402


def trained(config: str, artifact_dir: str | None, minutes: float, tmp: Path) -> Path:
    if artifact_dir:
        return Path(artifact_dir)
    from models.training.loop import load_config, train

    cfg = load_config(ROOT / "configs" / config)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_minutes": minutes})})
    out = tmp / config.removesuffix(".yaml")
    m = train(cfg, out, progress=False)
    print(f"{config}: trained {m['steps']} steps, test NLL {m['test_nll_nats']:.2f} nats, {m['parameters']:,} parameters")
    return out / "artifact"


def nll(model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """NLL (nats) as the anomaly route computes it (discrete features at their bin midpoints)."""
    from models.anomaly.scoring import model_scorer

    return -model_scorer(model)(x, None)


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
    from models.anomaly.scoring import AnomalyScorer
    from models.artifacts import store as artifact
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

    # attribution as the route computes it (features and the schema's groups, models.anomaly.attribution)
    from models.anomaly.attribution import describe_parts, part_attribution, part_variants, record_parts

    cal = record_calibration_of(model, model.manifest.calibration)
    parts, plabels, members = record_parts(model.spec, cal, None, anom.astype(np.float32))
    v = part_variants(anom.astype(np.float32), parts)
    base = scorer.statistic(nll(model, anom.astype(np.float32)), x=anom.astype(np.float32))
    a = part_attribution(base, scorer.statistic(nll(model, v), x=v), len(parts), parts[0][1].shape[-2])
    tops = [d[0] for d in describe_parts(a, plabels, members, 1)]
    feats = np.array(feats)
    kinds = np.array(kinds)
    names = model.spec.feature_names
    first = np.array([t.get("feature") == names[f] for t, f in zip(tops, feats)])
    single = np.isin(kinds, ["unit_error", "implausible"])
    bp_group = np.array([t.get("group") == "blood pressure" for t in tops])
    print(f"attribution: planted feature ranked first in {100 * first[single].mean():.1f}% of {single.sum()} single-feature "
          f"anomalies (unit_error {100 * first[kinds == 'unit_error'].mean():.1f}%, implausible "
          f"{100 * first[kinds == 'implausible'].mean():.1f}%); hypotension: the blood-pressure group ranked first in "
          f"{100 * bp_group[kinds == 'hypotension'].mean():.1f}% (heart rate "
          f"{100 * np.mean([t.get('feature') == 'Heart Rate' for t, k in zip(tops, kinds) if k == 'hypotension']):.1f}%)")


def record_calibration_of(model, scorer_cal):  # noqa: ANN001, ANN201 - Calibration
    """The artifact's calibration, with the absent-feature parts computed here when it predates them."""
    if scorer_cal.proposal is not None:
        return scorer_cal
    from models.anomaly.calibration import record_calibration
    from models.data import load_dataset

    data = load_dataset(model.manifest.metrics.get("data", "mimic-vitals"))
    print("(the artifact predates absent-feature calibration: proposal and calibration records computed here)")
    return scorer_cal.model_copy(update=record_calibration(model, data.split("val"), data.split("train"),
                                                           data.known["val"] if data.known else None))


def pattern_p_values(pcal, score, x: np.ndarray, observed: np.ndarray, stat: str | None = None):  # noqa: ANN001, ANN201
    """Per record: marginal NLL, p-value against its pattern's calibration, and a ranking score (−log p, ties by z)."""
    from models.anomaly.marginal import pattern_of

    nll = np.empty(len(x))
    p = np.empty(len(x))
    z = np.empty(len(x))
    patterns = [pattern_of(o) for o in observed]
    groups: dict = {}
    for i, pat in enumerate(patterns):
        groups.setdefault(pat, []).append(i)
    for pat, idx in groups.items():
        idx = np.asarray(idx)
        sc = pcal.scorer(pat, score)
        nll[idx] = -pcal.log_marginal(x[idx], pat, score)
        s = sc.statistic(nll[idx], stat, x[idx])
        ref = sc._reference(sc.resolve(stat))
        p[idx] = sc.p_values(nll[idx], stat, x[idx])
        z[idx] = (s - ref.mean()) / max(ref.std(), 1e-9)
    return nll, p, -np.log(p) + 1e-6 * z, patterns


def measured_only_cases(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str], list[int]]:
    """The missing-data experiment's test set: carried-forward normal records ``(N, 17)`` and which cells were measured,
    planted anomalies (10%, the kinds in turn) with their masks (what was planted counts as measured), kinds and
    planted features."""
    from models.data.cohort import generate_vitals, plant_vital_anomaly
    from models.data.mimic import impute
    from models.data.mimic_schema import INDEX

    c = generate_vitals(120, 48, seed=101)
    measured = np.isfinite(c.values)
    x = impute(c.values, c.patient).values
    rows = rng.choice(len(x), len(x) // 10, replace=False)
    anom, anom_obs, kinds, feats = x[rows].copy(), measured[rows].copy(), [], []
    bp = [INDEX[k] for k in ("Systolic blood pressure", "Diastolic blood pressure", "Mean blood pressure")]
    for i in range(len(rows)):
        k, f = plant_vital_anomaly(anom[i], rng, ["hypotension", "unit_error", "implausible"][i % 3])
        kinds.append(k)
        feats.append(f)
        anom_obs[i, bp + [INDEX["Heart Rate"]] if k == "hypotension" else [f]] = True
    return x, measured, anom, anom_obs, kinds, feats


def missing_data(art: Path, rng: np.random.Generator, samples: int, pattern_records: int | None) -> None:
    """Records as monitors send them: only this hour's measurements (the generator's missingness).

    Patterns stored in the artifact use theirs; any other is calibrated from at most ``pattern_records``
    calibration records (``None``: every usable one), as the service builds a pattern on first use."""
    from collections import Counter

    from models.anomaly.missing import PatternCalibrations
    from models.anomaly.scoring import AnomalyScorer, model_scorer
    from models.artifacts import store as artifact
    from models.data.cohort import generate_vitals
    from models.data.mimic import impute

    model = artifact.load(art).eval()
    cal = record_calibration_of(model, model.manifest.calibration)
    scorer = AnomalyScorer(cal)
    score = model_scorer(model)
    pcal = PatternCalibrations(cal, model.spec.discrete_features, samples=samples, cache=100_000, cold_records=pattern_records)
    x, measured, anom, anom_obs, kinds, feats = measured_only_cases(rng)
    n_anom = len(anom)
    full = np.concatenate([x, anom]).astype(np.float32)
    obs = np.concatenate([measured, anom_obs])
    labels = np.array(["normal"] * len(x) + kinds)
    fill = np.asarray(cal.fill, dtype=np.float32)
    median = np.where(obs, full, fill).astype(np.float32)
    t0 = time.monotonic()
    _, _, rank_marginal, _ = pattern_p_values(pcal, score, full, obs)
    t_marginal = time.monotonic() - t0
    scores = {"complete": scorer.statistic(-score(full, None), x=full),
              "measured, median fill": scorer.statistic(-score(median, None), x=median),
              "measured, marginal": rank_marginal}
    table(f"Missing data: {len(x)} normal patient-hours ({obs[:len(x)].sum(1).mean():.1f} of 17 features measured on average), "
          f"{n_anom} anomalies; AUROC/AUPRC of the default statistic ({scorer.default}); marginal: K = {samples}, ranked by "
          f"per-pattern p-value", scores, labels)

    f = generate_vitals(200, 48, seed=202)
    f_obs = np.isfinite(f.values)
    fresh = impute(f.values, f.patient).values.astype(np.float32)
    f_median = np.where(f_obs, fresh, fill).astype(np.float32)
    t0 = time.monotonic()
    _, p_marg, _, pats = pattern_p_values(pcal, score, fresh, f_obs)
    t_fresh = time.monotonic() - t0
    flags = {"complete": scorer.p_values(-score(fresh, None), x=fresh) <= 0.01,
             "measured, median fill": scorer.p_values(-score(f_median, None), x=f_median) <= 0.01,
             "measured, marginal": p_marg <= 0.01}
    common = [pat for pat, _ in Counter(pats).most_common(5)]
    names = model.spec.feature_names
    print(f"\nRealised FPR at the 1% target on {len(fresh)} fresh normal patient-hours of 200 patients "
          f"({len(set(pats))} missingness patterns):\n")
    print("| view | overall | " + " | ".join(f"pattern {k + 1}" for k in range(len(common))) + " |")
    print("|---|---|" + "---|" * len(common))
    in_pat = [np.array([p == pat for p in pats]) for pat in common]
    for view, fl in flags.items():
        cells = [f"{100 * fl[m].mean():.2f}%" for m in in_pat] if view != "complete" else ["" for _ in in_pat]
        print(f"| {view} | {100 * fl.mean():.2f}% | " + " | ".join(cells) + " |")
    for k, (pat, m) in enumerate(zip(common, in_pat)):
        print(f"- pattern {k + 1} ({int(m.sum())} records): " + ", ".join(names[j] for j in pat))
    print(f"\nmarginal scoring cost: {len(full)} test records in {t_marginal:.1f} s, {len(fresh)} fresh in {t_fresh:.1f} s, "
          f"K = {samples}, {len(pcal.stored)} stored pattern calibrations, {len(pcal._cache)} built on first use "
          f"(≤ {pattern_records or pcal.records.shape[0]} records each)")

    # Attribution of the flagged anomalies, as the route computes it: observed parts only, marginal variants.
    from models.anomaly.attribution import describe_parts, part_attribution, part_variants, record_parts
    from models.anomaly.marginal import pattern_of

    p_all = np.exp(-np.floor(rank_marginal * 1e6) / 1e6)  # undo the tie-break: the per-pattern p-values
    anomalies = np.flatnonzero(labels != "normal")
    flagged = p_all[anomalies] <= 0.01 + 1e-9
    tops = []
    for i in anomalies:
        pat = pattern_of(obs[i])
        sc = pcal.scorer(pat, score)
        parts, plabels, members = record_parts(model.spec, cal, np.asarray(pat), full[i : i + 1])
        v = part_variants(full[i : i + 1], parts)
        base = sc.statistic(-pcal.log_marginal(full[i : i + 1], pat, score), x=full[i : i + 1])
        vs = sc.statistic(-pcal.log_marginal(v, pat, score), x=v)
        a = part_attribution(base, vs, len(parts), parts[0][1].shape[-2])
        tops.append(describe_parts(a, plabels, members, 1)[0][0])
    absent_top = np.array([not all(obs[i, names.index(f)] for f in ([t["feature"]] if "feature" in t else t["features"]))
                           for i, t in zip(anomalies, tops)])
    kinds_a = labels[anomalies]
    hyp = kinds_a == "hypotension"
    bp_top = np.array([t.get("group") == "blood pressure" for t in tops])
    hr_top = np.array([t.get("feature") == "Heart Rate" for t in tops])
    planted = np.concatenate([np.full(len(x), -1), np.array(feats)])
    single = ~hyp
    first = np.array([t.get("feature") == names[planted[i]] for i, t in zip(anomalies, tops)])
    print(f"\nattribution (measured only, marginal; observed features and groups): top part is a feature the client never sent in "
          f"{100 * absent_top[flagged].mean():.1f}% of the {flagged.sum()} flagged anomalies ({100 * absent_top.mean():.1f}% of all "
          f"{len(anomalies)}); hypotension explained by the blood-pressure group in {100 * bp_top[hyp].mean():.1f}% of {hyp.sum()} "
          f"(heart rate {100 * hr_top[hyp].mean():.1f}%), in {100 * bp_top[hyp & flagged].mean():.1f}% of the {(hyp & flagged).sum()} "
          f"flagged; single-feature anomalies: planted feature first in {100 * first[single].mean():.1f}% of {single.sum()}")


def hypotension_ceiling(art: Path, cases: int = 600) -> None:
    """How often a density other than the flow, fitted to far more of the generator's records, puts the
    blood-pressure group first for planted hypotension, beside the flow on the same cases.

    The reference density is a 30-component full-covariance Gaussian mixture fitted to the 9 continuous vitals that
    carry the pressures, heart rate and what informs the patient's severity, on 192,000 carried-forward records of
    4,000 generated patients (the generator's own process, 5× the flow's 800 training patients). Its attribution uses
    3,000 normal tuples as references for each part, so that the best typical value is found for either part. The
    flow is attributed with 1,000 training tuples per part, and with the route's own references (9 quantiles or
    principal-component tuples, plus the conditional expectation)."""
    from scipy.special import logsumexp
    from sklearn.mixture import GaussianMixture

    from models.anomaly.attribution import describe_parts, part_attribution, part_variants, record_parts
    from models.anomaly.scoring import AnomalyScorer, model_scorer
    from models.artifacts import store as artifact
    from models.data import load_dataset
    from models.data.cohort import generate_vitals, plant_vital_anomaly
    from models.data.mimic import impute
    from models.data.mimic_schema import INDEX

    rng = np.random.default_rng(0)
    c = generate_vitals(120, 48, seed=101)
    x = impute(c.values, c.patient).values
    hyp = x[rng.choice(len(x), cases, replace=False)].astype(np.float32)
    for row in hyp:
        plant_vital_anomaly(row, rng, "hypotension")
    bp = [INDEX[k] for k in ("Systolic blood pressure", "Diastolic blood pressure", "Mean blood pressure")]
    hr = [INDEX["Heart Rate"]]

    def best_drop(stat, refs: np.ndarray, part: list[int], cases: np.ndarray = hyp) -> np.ndarray:
        """Per case: the statistic minus its minimum over the reference tuples put into ``part``."""
        base, out = stat(cases), np.empty(len(cases))
        for i in range(len(cases)):
            v = np.repeat(cases[i : i + 1], len(refs), 0)
            v[:, part] = refs[:, part]
            out[i] = stat(v).min()
        return base - out

    cols = bp + hr + [INDEX[k] for k in ("Respiratory rate", "Oxygen saturation", "Temperature", "Glucose", "pH")]
    big = generate_vitals(4000, 48, seed=0)
    xb = impute(big.values, big.patient).values.astype(np.float64)
    mu, sd = xb[:, cols].mean(0), xb[:, cols].std(0)
    t0 = time.monotonic()
    gm = GaussianMixture(30, covariance_type="full", random_state=0, max_iter=200).fit((xb[:, cols] - mu) / sd)
    fit_s = time.monotonic() - t0

    def gm_nll(v: np.ndarray) -> np.ndarray:
        return -gm.score_samples((np.asarray(v, dtype=np.float64)[:, cols] - mu) / sd)

    refs = xb[rng.choice(len(xb), 3000, replace=False)]
    g_bp, g_hr = best_drop(gm_nll, refs, bp), best_drop(gm_nll, refs, hr)

    def gm_marginal_nll(v: np.ndarray, keep: list[int]) -> np.ndarray:
        """Exact NLL of the mixture's marginal over ``keep`` (positions in ``cols``): each component's Gaussian restricted."""
        z = (np.asarray(v, dtype=np.float64)[:, [cols[j] for j in keep]] - mu[keep]) / sd[keep]
        logs = []
        for w, m, cov in zip(gm.weights_, gm.means_, gm.covariances_):
            chol = np.linalg.cholesky(cov[np.ix_(keep, keep)])
            d = np.linalg.solve(chol, (z - m[keep]).T)
            logs.append(np.log(w) - 0.5 * (d**2).sum(0) - np.log(np.diag(chol)).sum() - 0.5 * len(keep) * np.log(2 * np.pi))
        return -logsumexp(np.array(logs), axis=0)

    _, _, b_anom, b_obs, b_kinds, _ = measured_only_cases(np.random.default_rng(1))  # missing_data's cases
    b_hyp = np.asarray(b_kinds) == "hypotension"
    mixture_192 = {}
    for view, masks in (("complete", np.ones_like(b_obs[b_hyp])), ("measured only, exact marginal", b_obs[b_hyp])):
        ahead = []
        for row, seen in zip(b_anom[b_hyp], masks):
            keep = [j for j, col in enumerate(cols) if seen[col]]

            def marginal(v: np.ndarray, keep: list[int] = keep) -> np.ndarray:
                return gm_marginal_nll(v, keep)
            ahead.append(best_drop(marginal, refs, bp, row[None])[0] > best_drop(marginal, refs, hr, row[None])[0])
        mixture_192[view] = 100 * np.mean(ahead)

    model = artifact.load(art).eval()
    cal = record_calibration_of(model, model.manifest.calibration)
    scorer, score = AnomalyScorer(cal), model_scorer(model)

    def flow_stat(v: np.ndarray) -> np.ndarray:
        return scorer.statistic(-score(v, None), x=v)

    train = load_dataset(model.manifest.metrics.get("data", "mimic-vitals")).split("train")
    refs = train[rng.choice(len(train), 1000, replace=False)]
    f_bp, f_hr = best_drop(flow_stat, refs, bp), best_drop(flow_stat, refs, hr)
    parts, labels, members = record_parts(model.spec, cal, None, hyp)
    v = part_variants(hyp, parts)
    a = part_attribution(flow_stat(hyp), flow_stat(v), len(parts), parts[0][1].shape[-2])
    tops = [d[0] for d in describe_parts(a, labels, members, 1)]
    route = np.mean([t.get("group") == "blood pressure" for t in tops])
    heart = np.mean([t.get("feature") == "Heart Rate" for t in tops])
    g = next(i for i, lab in enumerate(labels) if lab.get("group") == "blood pressure")
    h = next(i for i, lab in enumerate(labels) if lab.get("feature") == "Heart Rate")
    print(f"\n### Hypotension: how often a density puts the blood-pressure group first ({cases} planted cases, complete records)\n")
    print("| density, references | group removes (nats, mean) | heart rate removes | group ahead of heart rate | group first of all parts |")
    print("|---|---|---|---|---|")
    print(f"| Gaussian mixture, 30 components, 192,000 records (fit {fit_s:.0f} s); 3,000 normal tuples | {g_bp.mean():.2f} | "
          f"{g_hr.mean():.2f} | {100 * np.mean(g_bp > g_hr):.1f}% | |")
    print(f"| the flow; 1,000 training tuples | {f_bp.mean():.2f} | {f_hr.mean():.2f} | {100 * np.mean(f_bp > f_hr):.1f}% | |")
    print(f"| the flow; the route's references and ranking | {a[:, g].mean():.2f} | {a[:, h].mean():.2f} | "
          f"{100 * np.mean(a[:, g] > a[:, h]):.1f}% | {100 * route:.1f}% (heart rate {100 * heart:.1f}%) |")

    # The route on the same 192 cases, complete and measured-only (missing_data's pattern calibrations, K = 32).
    from models.anomaly.marginal import pattern_of
    from models.anomaly.missing import PatternCalibrations

    pcal = PatternCalibrations(cal, model.spec.discrete_features, samples=32, cache=100_000)
    route_192 = {}
    for view, masks in (("complete", None), ("measured only, exact marginal", b_obs[b_hyp])):
        ahead, first = [], []
        for k, row in enumerate(b_anom[b_hyp].astype(np.float32)):
            r = row[None]
            if masks is None:
                stat, pat = flow_stat, None
            else:
                pat = pattern_of(masks[k])
                sc = pcal.scorer(pat, score)

                def stat(v: np.ndarray, sc=sc, pat=pat) -> np.ndarray:  # noqa: ANN001
                    return sc.statistic(-pcal.log_marginal(v, pat, score), x=v)
            parts, labels, members = record_parts(model.spec, cal, None if pat is None else np.asarray(pat), r)
            a = part_attribution(stat(r), stat(part_variants(r, parts)), len(parts), parts[0][1].shape[-2])
            g = next(i for i, lab in enumerate(labels) if lab.get("group") == "blood pressure")
            h = next(i for i, lab in enumerate(labels) if lab.get("feature") == "Heart Rate")
            ahead.append(a[0, g] > a[0, h])
            first.append(describe_parts(a, labels, members, 1)[0][0].get("group") == "blood pressure")
        route_192[view] = (100 * np.mean(ahead), 100 * np.mean(first))
    print(f"\nThe missing-data experiment's own {b_hyp.sum()} hypotension cases (the must-show's cases):\n")
    print("| records | mixture: group ahead of heart rate | route: group ahead of heart rate | route: group first of all parts |")
    print("|---|---|---|---|")
    for view, v in mixture_192.items():
        label = "complete" if view == "complete" else "measured only (mixture: exact marginal; route: K = 32)"
        print(f"| {label} | {v:.1f}% | {route_192[view][0]:.1f}% | {route_192[view][1]:.1f}% |")


def small_csv(reps: int, tmp: Path) -> None:
    """A small real dataset, as a new user would try it: scikit-learn's breast-cancer records (569 real records,
    30 features). The benign class is the normal population: per repetition, 200 benign records train the flow
    (a ``csv:`` file, the vitals config otherwise), 100 more calibrate it (``flowserve calibrate --data csv:FILE``),
    the remaining 57 are fresh normal records; all 212 malignant records are the anomalies."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.metrics import roc_auc_score

    from models.anomaly.calibration import recalibrate
    from models.anomaly.scoring import AnomalyScorer, model_scorer
    from models.artifacts import store as artifact
    from models.training.loop import CalibrationConfig, load_config, train

    data = load_breast_cancer()
    x, y = data.data.astype(np.float32), data.target  # target 1 = benign
    names = [n.replace(" ", "_") for n in data.feature_names]
    benign, malignant = x[y == 1], x[y == 0]

    def write(path: Path, rows: np.ndarray) -> Path:
        path.write_text(",".join(names) + "\n" + "\n".join(",".join(f"{v:.6g}" for v in r) for r in rows) + "\n")
        return path

    base = load_config(ROOT / "configs" / "mimic_vitals.yaml")
    flags_default, flags_cal, au, au_iso, au_gauss, n_default = [], [], [], [], [], []
    t0 = time.monotonic()
    for rep in range(reps):
        order = np.random.default_rng(rep).permutation(len(benign))
        tr, ca, fr = benign[order[:200]], benign[order[200:300]], benign[order[300:]]
        d = tmp / f"csv{rep}"
        d.mkdir()
        # calibrated separately below, so training keeps almost every record (min_records 12: the old 90/5/5 split's size)
        cfg = base.model_copy(update={"data": f"csv:{write(d / 'train.csv', tr)}", "anomaly_statistic": "nll", "seed": rep,
                                      "calibration": CalibrationConfig(min_records=12),
                                      "model": base.model.model_copy(update={"steps": 4, "hidden": 64}),
                                      "train": base.train.model_copy(update={"steps": 800, "max_minutes": None, "batch_size": 64,
                                                                             "eval_every": 100})})
        train(cfg, d / "run", progress=False)
        art = d / "run" / "artifact"
        model = artifact.load(art)
        score = model_scorer(model)
        test = np.concatenate([fr, malignant])
        nll = -score(test, None)
        default = AnomalyScorer(model.manifest.calibration)  # the training split's own calibration (min_records: 100)
        n_default.append(default.n)
        flags_default.append(default.p_values(nll[: len(fr)]) <= 0.05)
        recalibrate(art, f"csv:{write(d / 'calibration.csv', ca)}")
        scorer = AnomalyScorer(artifact.read_manifest(art).calibration)
        flags_cal.append(scorer.p_values(nll[: len(fr)]) <= 0.05)
        lab = np.r_[np.zeros(len(fr)), np.ones(len(malignant))]
        au.append(roc_auc_score(lab, nll))
        b = baselines(tr, test)
        au_iso.append(roc_auc_score(lab, b["IsolationForest"]))
        au_gauss.append(roc_auc_score(lab, b["Mahalanobis"]))
    fd, fc = np.concatenate(flags_default), np.concatenate(flags_cal)
    print(f"\n### Small real CSV: breast cancer (benign = normal), {reps} random splits, {time.monotonic() - t0:.0f} s\n")
    print("| | value |\n|---|---|")
    print(f"| AUROC benign vs malignant: flow (NLL) | {np.mean(au):.3f} ± {np.std(au):.3f} |")
    print(f"| AUROC: IsolationForest / Mahalanobis (Ledoit-Wolf) | {np.mean(au_iso):.3f} / {np.mean(au_gauss):.3f} |")
    print(f"| realised FPR at the 5% target, training-time calibration ({int(np.mean(n_default))} held-out records; "
          f"resolution 1/{int(np.mean(n_default)) + 1}) | {100 * fd.mean():.2f}% of {len(fd)} fresh benign records |")
    print(f"| realised FPR at the 5% target, `flowserve calibrate --data csv:` (100 separate records) | "
          f"{100 * fc.mean():.2f}% of {len(fc)} |")


async def anomaly_load(url: str, bodies: list, secs: float, clients: int = 4, stream: bool = False) -> tuple[float, int]:
    """``clients`` closed-loop clients posting ``bodies`` (lists of records) to the bundled vitals' anomaly route for
    ``secs`` seconds (each client on its own drift stream with ``stream``); records/s and records scored."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        done = 0
        stop = time.monotonic() + secs

        async def worker(k: int) -> None:
            nonlocal done
            i = k
            while time.monotonic() < stop:
                body = {"records": bodies[i % len(bodies)], "explain": "none", **({"stream": f"ward-{k}"} if stream else {})}
                r = await client.post("/v1/models/mimic-vitals/anomaly", json=body)
                r.raise_for_status()
                done += len(bodies[i % len(bodies)])
                i += clients

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(clients)))
        return done / (time.monotonic() - t0), done


def route_cost(seconds: float, tmp: Path, frontends: int | None = None) -> None:
    """The anomaly route's rows/s on the bundled mimic-vitals, 64 records per request, 4 clients: complete
    records vs measured-only records (K flow rows each; pattern calibrations built in a first pass, reported).

    The first pass opens a connection per request, so with ``frontends`` HTTP front-end processes the kernel
    spreads its requests over all of them, as it spreads a real feed's."""
    import httpx

    from models.data.cohort import generate_vitals
    from models.data.mimic import impute
    from models.data.mimic_schema import VITAL_NAMES
    from tests.server import running_server

    c = generate_vitals(40, 48, seed=505)
    full = impute(c.values, c.patient).values
    measured = np.isfinite(c.values)
    complete = [[dict(zip(VITAL_NAMES, map(float, r))) for r in full[i : i + 64]] for i in range(0, len(full) - 63, 64)]
    partial = [[{n: float(v) for n, v, m in zip(VITAL_NAMES, r, o) if m} for r, o in zip(full[i : i + 64], measured[i : i + 64])]
               for i in range(0, len(full) - 63, 64)]

    import json

    stored = [tuple(p["pattern"]) for p in json.loads((ROOT / "model_repository/mimic-vitals/1/manifest.json").read_text())
              ["calibration"].get("patterns", [])]
    seen = {tuple(np.flatnonzero(m)) for m in measured[: len(partial) * 64]}
    train_first = stored[0] if stored else (1, 8, 10, 11, 12, 13)  # the training data's most frequent pattern
    all_but_one = [tuple(j for j in range(17) if j != k) for k in range(17)]
    never = next(p for p in all_but_one if p not in stored and p not in seen)

    def one_record(client: httpx.Client, pattern: tuple[int, ...]) -> float:
        """Seconds to the answer for one record of ``pattern``, the first of its pattern on this server."""
        body = {"records": [{VITAL_NAMES[j]: float(full[0, j]) for j in pattern}], "explain": "none"}
        t = time.monotonic()
        client.post("/v1/models/mimic-vitals/anomaly", json=body).raise_for_status()
        return time.monotonic() - t

    env = {"FLOWSERVE_HTTP_WORKERS": str(frontends)} if frontends else {}
    with running_server(ROOT / "model_repository", tmp, **env) as s:
        with httpx.Client(base_url=s.url, timeout=600) as client:
            one_record(client, tuple(range(17)))  # a complete record first: what any first request pays, no pattern
            first_seen, first_never = one_record(client, train_first), one_record(client, never)
        t0 = time.monotonic()  # a first pass builds the patterns' calibrations
        for body in partial:
            with httpx.Client(base_url=s.url, timeout=600) as client:
                client.post("/v1/models/mimic-vitals/anomaly", json={"records": body, "explain": "none"}).raise_for_status()
        cold = time.monotonic() - t0
        n_patterns = len({tuple(m) for m in measured[: len(partial) * 64].tolist()})
        rate_c, _ = asyncio.run(anomaly_load(s.url, complete, seconds))
        rate_p, _ = asyncio.run(anomaly_load(s.url, partial, seconds))
    print(f"\n### Anomaly route cost (bundled mimic-vitals, 64 records per request, 4 clients, {seconds:.0f} s each; "
          f"HTTP front-ends: {frontends or 'default'})\n")
    print("| records | rows/s |\n|---|---|")
    print(f"| complete | {rate_c:.0f} |\n| measured only (marginal, K = 32) | {rate_p:.0f} |")
    print(f"\nratio measured-only / complete: {rate_p / rate_c:.3f}; first pass over {len(partial) * 64} measured-only records "
          f"({n_patterns} patterns, each calibration built once): {cold:.1f} s")
    print(f"first request of a pattern, one record: the training data's most frequent pattern {1000 * first_seen:.0f} ms "
          f"({'stored in the artifact' if train_first in stored else 'not stored'}), a pattern never seen {1000 * first_never:.0f} ms; "
          f"{len(stored)} patterns stored, {len(seen & set(stored))} of the first pass's {n_patterns} among them")


def waveforms(art: Path, rng: np.random.Generator) -> None:
    from models.anomaly.attribution import attribute, segment_bounds
    from models.anomaly.scoring import AnomalyScorer
    from models.artifacts import store as artifact
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
    ap.add_argument("--only", choices=["vitals", "missing", "ceiling", "csv", "cost", "waveforms"])
    ap.add_argument("--cost-seconds", type=float, default=15.0)
    ap.add_argument("--cost-frontends", type=int, help="HTTP front-end processes of the server --only cost starts (default: the service's)")
    ap.add_argument("--csv-reps", type=int, default=10, help="random splits of the small-CSV experiment")
    ap.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, help="importance samples K for absent features")
    ap.add_argument("--pattern-records", type=int, default=COLD_PATTERN_RECORDS,
                    help="calibration records behind a pattern not stored in the artifact (0: every usable one)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        if args.only in (None, "vitals", "missing", "ceiling"):
            art = trained("mimic_vitals.yaml", args.vitals_artifact, args.minutes, Path(tmp))
            if args.only in (None, "vitals"):
                vitals(art, rng)
            if args.only in (None, "vitals", "missing"):
                missing_data(art, np.random.default_rng(1), args.samples, args.pattern_records or None)
            if args.only in (None, "ceiling"):
                hypotension_ceiling(art)
        if args.only in (None, "cost"):
            route_cost(args.cost_seconds, Path(tmp), args.cost_frontends)
        if args.only in (None, "csv"):
            small_csv(args.csv_reps, Path(tmp))
        if args.only in (None, "waveforms"):
            waveforms(trained("mimic_waveform.yaml", args.waveform_artifact, args.minutes, Path(tmp)), rng)


if __name__ == "__main__":
    main()
