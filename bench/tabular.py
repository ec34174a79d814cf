"""The tabular preset against classical detectors on real data that ships with scikit-learn.

Protocol (ADBench's semi-supervised setting: detectors fit on normal records only). Per split, the
normal records are shuffled: 50% train, 25% calibrate, 25% are the test's normal records; every
anomaly is in the test. Each detector fits the same training records:

* the flow: ``flowserve train --preset tabular --data csv:train.csv`` as a user would run it (the
  preset holds a quarter of the file out for early stopping), through :func:`models.training.loop.train`;
* "its Gaussian": the flow's own initial model (Yeo-Johnson marginals + cross-validated shrinkage
  Gaussian), cut from the trained artifact, the model the flow falls back to;
* PyOD's KNN, IsolationForest and ECOD on standardised records (scaler fitted on the training
  records), PyOD's defaults. ECOD scores a batch against the ECDFs of the training records *and
  the batch*; a test set that is mostly anomalies would shift its own reference, so each test
  record is scored alone;
* a Ledoit-Wolf Gaussian (Mahalanobis distance) on the raw and on the standardised records.

Reported: AUROC and AUPRC, mean ± sd over the splits, fitting time; held-out log-likelihood of
the Gaussians and the flow (nats per record, data space); and for the flow the realised false-
positive rate at the 5% target on the test's normal records after ``flowserve calibrate`` on the
calibration records. ``--small N`` repeats the flow-vs-its-Gaussian comparison with N training records.

Data sets (all real, offline, from ``sklearn.datasets``):

* ``breast-cancer``: Wisconsin diagnostic breast cancer, 569 records × 30 cell-nucleus measurements;
  benign (357) normal, malignant (212) anomalies.
* ``wine``: 178 wines × 13 chemical measurements (two integer-valued columns); cultivars 2 and 3 (119)
  normal, cultivar 1 (59) anomalies, as in ADBench's Wine.
* ``optdigits``: 1,797 8×8 handwritten digits × 64 pixel counts (integers 0–16, some columns constant);
  digits 1–9 (1,619) normal, digit 0 (178) anomalies, as in ADBench's optdigits.

Usage: ``python bench/tabular.py [--splits 10] [--datasets breast-cancer,wine,optdigits] [--small 40]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]] = {}


def dataset(name: str):  # noqa: ANN201 - a registering decorator
    def register(fn: Callable[[], tuple[np.ndarray, np.ndarray, list[str]]]) -> Callable:
        DATASETS[name] = fn
        return fn
    return register


@dataset("breast-cancer")
def breast_cancer() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return d.data[d.target == 1], d.data[d.target == 0], list(d.feature_names)


@dataset("wine")
def wine() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_wine

    d = load_wine()
    return d.data[d.target != 0], d.data[d.target == 0], list(d.feature_names)


@dataset("optdigits")
def optdigits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data[d.target != 0], d.data[d.target == 0], [f"pixel_{i}" for i in range(d.data.shape[1])]


def write_csv(path: Path, names: list[str], rows: np.ndarray) -> str:
    """A ``csv:`` data spec for ``rows`` written with a header, as a user's export would be."""
    path.write_text(",".join(n.replace(" ", "_") for n in names) + "\n"
                    + "\n".join(",".join(f"{v:.10g}" for v in r) for r in rows) + "\n")
    return f"csv:{path}"


def initial_gaussian(model):  # noqa: ANN001, ANN201 - DensityModel -> DensityModel
    """The flow's initial model: its marginal and whitening layers alone (the couplings left out)."""
    from models.density import DensityModel
    from models.flows import Sequential

    return DensityModel(Sequential(list(copy.deepcopy(model.flow.layers[:2]))), model.spec).eval()


def nll(model, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    """NLL (nats per record) as the anomaly route computes it (integer columns at their bin midpoints)."""
    from models.anomaly.scoring import model_scorer

    return -model_scorer(model)(x.astype(np.float32), None)


def classical(train: np.ndarray, test: np.ndarray, held_out: np.ndarray) -> dict[str, tuple[np.ndarray, float, float | None]]:
    """``name -> (test scores, fit seconds, held-out mean NLL or None)`` for the classical detectors."""
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from sklearn.covariance import LedoitWolf
    from sklearn.preprocessing import StandardScaler

    out = {}
    scaler = StandardScaler().fit(train)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    std = lambda v: (v - scaler.mean_) / scale  # noqa: E731
    for name, make in (("KNN", KNN), ("IsolationForest", lambda: IForest(random_state=0)), ("ECOD", ECOD)):
        t0 = time.perf_counter()
        det = make().fit(std(train))
        if name == "ECOD":  # ECOD ranks a batch by ECDFs of training + batch: one record at a time keeps the test set out
            scores = np.array([det.decision_function(row[None])[0] for row in std(test)])
        else:
            scores = det.decision_function(std(test))
        out[name] = (scores, time.perf_counter() - t0, None)
    for name, tr, te, ho, jac in (("Ledoit-Wolf raw", train, test, held_out, 0.0),
                                  ("Ledoit-Wolf standardised", std(train), std(test), std(held_out), float(np.log(scale).sum()))):
        t0 = time.perf_counter()
        lw = LedoitWolf().fit(tr)
        seconds = time.perf_counter() - t0
        logdet = np.linalg.slogdet(lw.covariance_)[1]
        gauss_nll = lambda v: 0.5 * (lw.mahalanobis(v) + logdet + v.shape[1] * np.log(2 * np.pi))  # noqa: E731
        out[name] = (gauss_nll(te), seconds, float(gauss_nll(ho).mean() + jac))
    return out


def run_dataset(name: str, splits: int, tmp: Path, small: int | None) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from models import presets
    from models.anomaly.calibration import recalibrate
    from models.anomaly.scoring import AnomalyScorer
    from models.artifacts import store as artifact
    from models.training.loop import load_config, train

    normal, anomalous, names = DATASETS[name]()
    base = load_config(presets.path("tabular"))
    rows: dict[str, dict[str, list[float]]] = {}
    fpr_flags, selected = [], []

    def add(method: str, key: str, value: float | None) -> None:
        if value is not None:
            rows.setdefault(method, {}).setdefault(key, []).append(value)

    t_all = time.monotonic()
    for rep in range(splits):
        order = np.random.default_rng(rep).permutation(len(normal))
        n_tr, n_ca = len(normal) // 2, len(normal) // 4
        tr, ca, te_norm = normal[order[:n_tr]], normal[order[n_tr : n_tr + n_ca]], normal[order[n_tr + n_ca :]]
        test = np.concatenate([te_norm, anomalous])
        labels = np.r_[np.zeros(len(te_norm)), np.ones(len(anomalous))]
        d = tmp / f"{name}-{rep}"
        d.mkdir()
        cfg = base.model_copy(update={"data": write_csv(d / "train.csv", names, tr), "seed": rep})
        t0 = time.perf_counter()
        metrics = train(cfg, d / "run", progress=False)
        flow_seconds = time.perf_counter() - t0
        art = d / "run" / "artifact"
        model = artifact.load(art)
        gauss = initial_gaussian(model)
        selected.append(metrics["selected"])
        scores = {"flow (tabular preset)": (nll(model, test), flow_seconds, float(nll(model, te_norm).mean())),
                  "its Gaussian": (nll(gauss, test), None, float(nll(gauss, te_norm).mean())),
                  **classical(tr, test, te_norm)}
        for method, (s, seconds, heldout) in scores.items():
            add(method, "auroc", roc_auc_score(labels, s))
            add(method, "auprc", average_precision_score(labels, s))
            add(method, "seconds", seconds)
            add(method, "nll", heldout)
        recalibrate(art, write_csv(d / "calibration.csv", names, ca))
        scorer = AnomalyScorer(artifact.read_manifest(art).calibration)
        fpr_flags.append(scorer.p_values(nll(model, te_norm)) <= 0.05)

    def cell(method: str, key: str, fmt: str = "{:.3f}") -> str:
        v = rows[method].get(key)
        return "" if not v else f"{fmt.format(np.mean(v))} ± {fmt.format(np.std(v))}" if key != "seconds" else f"{np.mean(v):.2f}"

    print(f"\n### {name}: {len(normal)} normal, {len(anomalous)} anomalous records × {normal.shape[1]} features; "
          f"{splits} splits, {time.monotonic() - t_all:.0f} s\n")
    print("| detector | AUROC | AUPRC | fit s | held-out NLL (nats/record) |")
    print("|---|---|---|---|---|")
    for method in rows:
        print(f"| {method} | {cell(method, 'auroc')} | {cell(method, 'auprc')} | {cell(method, 'seconds')} | "
              f"{cell(method, 'nll', '{:.1f}')} |")
    best = max((m for m in rows if m not in ("flow (tabular preset)", "its Gaussian")), key=lambda m: np.mean(rows[m]["auroc"]))
    flow_au = np.mean(rows["flow (tabular preset)"]["auroc"])
    print(f"\nflow − best classical ({best}): {flow_au - np.mean(rows[best]['auroc']):+.3f} AUROC; "
          f"the flow kept its couplings in {selected.count('flow')} of {splits} splits (else its Gaussian)")
    flags = np.concatenate(fpr_flags)
    print(f"realised FPR at the 5% target after `flowserve calibrate` on {n_ca} records: {100 * flags.mean():.2f}% "
          f"of {len(flags)} test normal records")
    if small:
        small_records(name, normal, anomalous, names, base, splits, small, tmp)


def small_records(name: str, normal: np.ndarray, anomalous: np.ndarray, names: list[str], base, splits: int,  # noqa: ANN001
                  n: int, tmp: Path) -> None:
    """The flow and its Gaussian with only ``n`` training records (the preset holds some out for early stopping)."""
    from sklearn.metrics import roc_auc_score

    from models.artifacts import store as artifact
    from models.training.loop import train

    au_flow, au_gauss, nll_flow, nll_gauss, kept = [], [], [], [], 0
    for rep in range(splits):
        order = np.random.default_rng(1000 + rep).permutation(len(normal))
        tr, te_norm = normal[order[:n]], normal[order[n:]]
        test = np.concatenate([te_norm, anomalous])
        labels = np.r_[np.zeros(len(te_norm)), np.ones(len(anomalous))]
        d = tmp / f"{name}-small-{rep}"
        d.mkdir()
        metrics = train(base.model_copy(update={"data": write_csv(d / "train.csv", names, tr), "seed": rep}), d / "run", progress=False)
        kept += metrics["selected"] == "flow"
        model = artifact.load(d / "run" / "artifact")
        gauss = initial_gaussian(model)
        au_flow.append(roc_auc_score(labels, nll(model, test)))
        au_gauss.append(roc_auc_score(labels, nll(gauss, test)))
        nll_flow.append(nll(model, te_norm).mean())
        nll_gauss.append(nll(gauss, te_norm).mean())
    print(f"\n{name}, {n} training records, {splits} splits: AUROC flow {np.mean(au_flow):.3f} ± {np.std(au_flow):.3f}, "
          f"its Gaussian {np.mean(au_gauss):.3f} ± {np.std(au_gauss):.3f}; held-out NLL flow {np.mean(nll_flow):.1f}, "
          f"Gaussian {np.mean(nll_gauss):.1f} nats/record; couplings kept in {kept} of {splits}")


def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", type=int, default=10, help="random splits per data set (at least 1)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated: " + ", ".join(DATASETS))
    ap.add_argument("--small", type=int, default=40, help="also train on this many normal records of breast-cancer (0: skip)")
    args = ap.parse_args()
    if args.splits < 1:
        ap.error("--splits must be at least 1")
    chosen = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(chosen) - set(DATASETS))
    if unknown:
        ap.error(f"unknown data sets {unknown}; choose from {list(DATASETS)}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            run_dataset(name, args.splits, Path(tmp), args.small if name == "breast-cancer" and args.small else None)


if __name__ == "__main__":
    main()
