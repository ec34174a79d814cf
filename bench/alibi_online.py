"""alibi-detect's online drift detectors on streams the drift bench prepared (``bench/drift.py`` runs this
file with a Python that has alibi-detect, which pins numpy < 2 and so lives in its own virtual environment).

Input (``.npz``): ``ref (N, D)`` the reference records; per scenario ``pool_<name> (M, D)`` and
``idx_<name> (R, L)`` (each row one stream of indices into the pool); ``scalar`` arrays ``ert``,
``window``, ``bootstraps``. Output (``.json``): per detector and scenario, the 1-based record at
which each stream first alarms (``L + 1`` when it does not), and the seconds each detector took.

Detectors, as alibi-detect's docs configure them: ``MMDDriftOnline`` and ``LSDDDriftOnline``
(PyTorch backend) with one window, ``CVMDriftOnline`` with one window (univariate tests per feature,
combined by alibi-detect); each configured once at the given ERT from the reference set, and reset
between streams.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    data = np.load(src)
    from alibi_detect.cd import CVMDriftOnline, LSDDDriftOnline, MMDDriftOnline

    ref = data["ref"].astype(np.float32)
    ert, window = float(data["ert"]), int(data["window"])
    boots = int(data["bootstraps"])
    scenarios = [k.removeprefix("idx_") for k in data.files if k.startswith("idx_")]
    makers = {
        "MMDDriftOnline": lambda: MMDDriftOnline(ref, ert=ert, window_size=window, backend="pytorch", n_bootstraps=boots, verbose=False),
        "LSDDDriftOnline": lambda: LSDDDriftOnline(ref, ert=ert, window_size=window, backend="pytorch", n_bootstraps=boots, verbose=False),
        "CVMDriftOnline": lambda: CVMDriftOnline(ref, ert=ert, window_sizes=[window], n_bootstraps=max(boots, int(50 * ert)), verbose=False),
    }
    base = boots
    result: dict = {"alibi_detect": __import__("alibi_detect").__version__}
    for name, make in makers.items():
        t0 = time.monotonic()
        boots = base
        for attempt in range(4):  # CVM's per-feature thresholds need more bootstraps the more features there are
            try:
                det = make()
                break
            except ValueError as e:
                if "quantile should not be estimated" not in str(e) or attempt == 3:
                    raise
                boots *= 4
                print(f"{name}: {e}; {boots} bootstraps", file=sys.stderr)
        setup = time.monotonic() - t0
        per: dict[str, list[int]] = {}
        for sc in scenarios:
            pool, idx = data[f"pool_{sc}"].astype(np.float32), data[f"idx_{sc}"]
            firsts = []
            for row in idx:
                det.reset_state() if hasattr(det, "reset_state") else det.reset()
                at = len(row) + 1
                for t, i in enumerate(row):
                    if det.predict(pool[i])["data"]["is_drift"]:
                        at = t + 1
                        break
                firsts.append(at)
            per[sc] = firsts
        result[name] = {"first_alarms": per, "setup_s": setup, "total_s": time.monotonic() - t0}
        print(f"{name}: {time.monotonic() - t0:.0f} s", file=sys.stderr)
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
