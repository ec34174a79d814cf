"""New connections under overload: how long a client that opens a fresh connection waits while
``--busy`` keep-alive clients saturate the server. Every server runs alone, side by side in one run.

Why: libuv (under uvloop) accepts one connection per event-loop turn (libuv PR #3696, 2022), and
a turn of a saturated server handles a request from every busy connection (hundreds of ms), so
new connections wait in the accept queue until the load drops or the client gives up. asyncio
accepts every pending connection on each readiness event.

Servers, each measured alone (``--busy`` closed-loop clients on kept-alive connections; after
``--warmup`` seconds, ``--fresh`` clients, ``--rate`` a second, each open a new connection for one request):

* bare uvicorn, a handler that spins ~0.8 ms of CPU, on uvloop and on asyncio (the cause alone);
* flowserve (the working tree), and with ``--baseline-ref REF`` flowserve at git ``REF``.

Prints fresh-connection latency p50/p90/max (a fresh request that fails or passes
``--timeout`` seconds counts as the timeout) and the busy clients' rows/s. Usage:
``python bench/fresh_connections.py [--busy 400] [--fresh 200] [--rate 20] [--repeats 3] [--baseline-ref REF]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import REPO, baseline_tree, flowserve_cmd, running  # noqa: E402  (bench/serving.py)

from models.data import load_dataset  # noqa: E402
from tests.server import free_port  # noqa: E402

BARE_APP = '''
import sys, time, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    t = time.perf_counter()
    while time.perf_counter() - t < 0.0008:  # ~0.8 ms of CPU per request, about a front-end's share
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop=sys.argv[2], log_level="error", backlog=4096)
'''


async def measure(url: str, path: str, body: bytes, busy: int, fresh: int, rate: float, warmup: float, timeout: float) -> dict:
    """``busy`` closed-loop clients from the start; after ``warmup`` seconds, ``fresh`` one-request
    clients, each on a new connection, ``rate`` per second; the busy clients stop when the last fresh
    one is answered. Latencies in seconds."""
    import aiohttp

    headers = {"content-type": "application/json"}
    done = asyncio.Event()
    answered = 0

    async def one(session: aiohttp.ClientSession) -> bool:
        async with session.post(path, data=body, headers=headers) as r:
            await r.read()
            return r.status == 200

    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=0)) as kept:
        async def hammer() -> None:
            nonlocal answered
            while not done.is_set():
                ok = await one(kept)  # (not ``answered += await ...``: that reads the count before the await)
                answered += ok

        hammers = [asyncio.create_task(hammer()) for _ in range(busy)]
        await asyncio.sleep(warmup)
        answered, t_busy = 0, time.perf_counter()

        async def new_client() -> float:
            t0 = time.perf_counter()
            try:
                async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=timeout)) as s:
                    ok = await one(s)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                ok = False
            return time.perf_counter() - t0 if ok else timeout

        arrivals = []
        for _ in range(fresh):  # steady arrivals: a burst would stall this client process, not the server
            arrivals.append(asyncio.create_task(new_client()))
            await asyncio.sleep(1 / rate)
        lat = np.array(await asyncio.gather(*arrivals))
        busy_rate = answered / (time.perf_counter() - t_busy)
        done.set()
        await asyncio.gather(*hammers, return_exceptions=True)
    return {"fresh_p50_s": float(np.percentile(lat, 50)), "fresh_p90_s": float(np.percentile(lat, 90)),
            "fresh_max_s": float(lat.max()), "fresh_timed_out": int((lat >= timeout).sum()), "busy_rows_per_s": busy_rate}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--busy", type=int, default=400, help="kept-alive closed-loop clients")
    ap.add_argument("--fresh", type=int, default=200, help="clients that each open a new connection for one request")
    ap.add_argument("--rate", type=float, default=20.0, help="fresh clients started per second")
    ap.add_argument("--warmup", type=float, default=4.0)
    ap.add_argument("--timeout", type=float, default=30.0, help="a fresh request's client timeout, seconds")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per server (whether the accept queue starves varies run to run)")
    ap.add_argument("--baseline-ref", default=None, help="also measure flowserve at this git ref")
    ap.add_argument("--no-bare", action="store_true", help="skip the bare uvicorn pair")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    body = json.dumps({"instances": load_dataset("digits").split("test")[:1].tolist(), "seed": 0}).encode()
    env = {"FLOWSERVE_DEVICES": "cpu", "FLOWSERVE_REPOSITORY": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp, baseline_tree(args.baseline_ref, Path(tmp) / "baseline") as tree:
        logs = Path(tmp)
        bare = logs / "bare.py"
        bare.write_text(BARE_APP)
        runs: list[tuple[str, str | None, Path | None]] = []  # (label, the bare app's event loop, flowserve's checkout)
        if not args.no_bare:
            runs += [(f"bare uvicorn, {loop}", loop, None) for loop in ("uvloop", "asyncio")]
        if tree is not None:
            runs.append((f"flowserve @ {args.baseline_ref}", None, tree))
        runs.append(("flowserve", None, None))
        for i, (label, loop, cwd) in enumerate(runs):
            port = free_port()
            argv = [sys.executable, str(bare), str(port), loop] if loop else flowserve_cmd(port)
            path, ready = ("/", "/") if loop else ("/v1/models/digits/score", "/v2/health/ready")
            with running(argv, ready, port, env, cwd, logs / f"{i}.log") as (url, _):
                for k in range(args.repeats):
                    results[f"{label} #{k + 1}"] = r = asyncio.run(measure(url, path, body, args.busy, args.fresh, args.rate, args.warmup, args.timeout))
                    print(f"{label + f' #{k + 1}':<36} fresh connections: p50 {r['fresh_p50_s']:6.2f} s  p90 {r['fresh_p90_s']:6.2f} s  "
                          f"max {r['fresh_max_s']:6.2f} s  timed out {r['fresh_timed_out']:4d}/{args.fresh}   "
                          f"busy clients {r['busy_rows_per_s']:6.0f} rows/s", flush=True)
    print("\n" + json.dumps({k: {m: round(v, 3) for m, v in r.items()} for k, r in results.items()}))


if __name__ == "__main__":
    main()
