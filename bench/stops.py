"""The stops a request makes in the project's code: a 1-row score and an anomaly request for a record
with absent features, followed through the single-process app (``FLOWSERVE_HTTP_WORKERS=0``, where
the whole path runs in one process and a profiler sees every call).

A *stop* is a call of a function defined in ``service/`` or ``models/`` (library and framework
calls are not counted, nor what they call back). For each request it prints the stops, the files
they are in, how often the path goes back into a file it had left, and how often it crosses
between ``service/`` and ``models/``. Run it on another checkout (``--root``, a git worktree of an
older commit) to compare layouts::

    python bench/stops.py [--root DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from pathlib import Path

import numpy as np


def follow(root: Path) -> dict[str, dict]:
    """Per request: the ordered stops ``[(file, function)]`` and their summary."""
    sys.path.insert(0, str(root))
    os.environ.update(FLOWSERVE_REPOSITORY=str(root / "model_repository"), FLOWSERVE_DEVICES="cpu", FLOWSERVE_DRIFT="0")
    try:
        from service.server import create_app
    except ImportError:  # the layout before service/ had a room per process
        from service.app import create_app

    import service

    assert Path(service.__file__).resolve().is_relative_to(root), f"service imported from {service.__file__}, not {root}"
    roots = (str(root / "service") + os.sep, str(root / "models") + os.sep)
    stops: list[tuple[str, str]] = []
    lock = threading.Lock()

    def profile(frame, event, arg):  # noqa: ANN001, ANN202
        if event == "call" and frame.f_code.co_filename.startswith(roots):
            with lock:
                stops.append((os.path.relpath(frame.f_code.co_filename, root), frame.f_code.co_name))

    digits = np.load(root / "model_repository" / "digits" / "1" / "examples.npy")[:1].tolist() \
        if (root / "model_repository" / "digits" / "1" / "examples.npy").exists() else [[[0] * 8] * 8]
    requests = {
        "1-row score": ("/v1/models/digits/score", {"instances": digits}),
        "anomaly, 1 record with absent features": ("/v1/models/mimic-vitals/anomaly",
                                                   {"records": [{"Heart Rate": 88, "Systolic blood pressure": 121}],
                                                    "explain": "none"}),
    }
    async def run() -> dict[str, dict]:
        import httpx

        app = create_app()
        out = {}
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://flowserve") as client:
                while (await client.get("/v2/health/ready")).status_code != 200:
                    await asyncio.sleep(0.2)
                for w in app.state.service.repository.workers:  # the device workers' threads are followed too
                    await w.run(sys.setprofile, profile)
                for label, (path, body) in requests.items():
                    for _ in range(2):  # warm: the pattern's calibration, caches
                        r = await client.post(path, json=body)
                        assert r.status_code == 200, r.text
                    stops.clear()
                    sys.setprofile(profile)
                    try:
                        r = await client.post(path, json=body)
                    finally:
                        sys.setprofile(None)
                    assert r.status_code == 200, r.text
                    out[label] = summarise([s for s in stops if not s[1].startswith("<")])  # not comprehensions, lambdas
                    stops.clear()
        return out

    return asyncio.run(run())


def summarise(path_stops: list[tuple[str, str]]) -> dict[str, int]:
    files = [f for f, _ in path_stops]
    changes = [b for a, b in zip(files, files[1:]) if a != b]
    left, back = set(), 0
    for a, b in zip(files, files[1:]):
        if a != b:
            left.add(a)
            back += b in left
    crossings = sum(1 for a, b in zip(files, files[1:]) if a.split(os.sep)[0] != b.split(os.sep)[0])
    return {"stops": len(path_stops), "files": len(set(files)), "file changes": len(changes),
            "back into a file already left": back, "service↔models crossings": crossings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent, help="checkout to follow")
    args = ap.parse_args()
    for label, summary in follow(args.root.resolve()).items():
        print(f"{label}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
