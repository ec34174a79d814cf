"""Time to ready: how long ``flowserve serve`` on the bundled repository takes until ``/v2/health/ready`` answers 200.

Side by side in one run, each ``--repeats`` times (median shown), the default process layout:

* ``cache off``: ``FLOWSERVE_ORT_CACHE_DIR=""``: every ONNX Runtime session optimises its graph;
* ``cache cold``: an empty cache directory (optimises, and writes the optimised graphs);
* ``cache warm``: the directory the cold start filled (``service.executor.ort_sessions``: an executor restarted
  after a crash, a reload, the next ``make serve``).

Then each bundled model's load in-process (open, warm-up, batch-invariance check), cache off vs warm.
Usage: ``python bench/startup.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving import REPO, flowserve_cmd, running  # noqa: E402  (bench/serving.py)

from tests.server import free_port  # noqa: E402


def time_to_ready(cache: str) -> float:
    port = free_port()
    t = time.perf_counter()
    env = {"FLOWSERVE_REPOSITORY": str(REPO), "FLOWSERVE_DEVICES": "cpu", "FLOWSERVE_ORT_CACHE_DIR": cache}
    with running(flowserve_cmd(port), "/v2/health/ready", port, env=env):
        return time.perf_counter() - t


def model_loads(cache: Path | None) -> dict[str, float]:
    """Seconds to open, warm and check each bundled model in this process."""
    from service.executor import compute
    from service.executor.compute import check_batch_invariance
    from service.executor.repository import versions
    from service.executor.runners import open_runner
    from service.settings import Settings

    settings = Settings(ort_cache_dir=cache)
    out = {}
    for model in sorted(p for p in REPO.iterdir() if p.is_dir()):
        version = versions(model)[-1]
        t = time.perf_counter()
        runner = open_runner(version, "cpu", settings)
        compute.warm(runner)
        check_batch_invariance(runner, settings)
        out[f"{model.name} ({runner.backend})"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows: dict[str, list[float]] = {"cache off": [], "cache cold": [], "cache warm": []}
    for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every variant
        with tempfile.TemporaryDirectory() as d:
            rows["cache off"].append(time_to_ready(""))
            rows["cache cold"].append(time_to_ready(d))
            rows["cache warm"].append(time_to_ready(d))
    off = statistics.median(rows["cache off"])
    print(f"time to ready, bundled repository, default layout (median of {args.repeats}):")
    for name, values in rows.items():
        med = statistics.median(values)
        print(f"  {name:<11} {med:6.1f} s   ×off {off / med:4.2f}   runs {' '.join(f'{v:.1f}' for v in values)}")
    with tempfile.TemporaryDirectory() as d:
        cold = model_loads(None)
        model_loads(Path(d))  # fills the cache
        warm = model_loads(Path(d))
    print("load in-process (open + warm-up + invariance check), seconds:")
    for name in cold:
        print(f"  {name:<32} cache off {cold[name]:6.2f}   warm {warm[name]:6.2f}   ×{cold[name] / warm[name]:4.2f}")


if __name__ == "__main__":
    main()
