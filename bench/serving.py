"""Serving benchmark over loopback: rows/s and latency percentiles, every server measured alone, side by side in one run.

Servers (each started, swept over client concurrency with the same closed-loop aiohttp load
generator, and stopped before the next starts):

* flowserve for each ``--http-workers`` value (``0``: one process; ``auto``: the default layout);
* flowserve with ``FLOWSERVE_MAX_BATCH_SIZE=1`` (no batching), in the default layout;
* with ``--baseline-ref REF``: flowserve as it was at git ``REF`` (a worktree), e.g. before a change;
* the peer: the same model behind LitServe (``bench/litserve_peer.py``), ``max_batch_size`` as
  ours, its default API-server processes; measured last (its idle workers spin) and stopped by
  its process group;

then the same runner called in-process at the batch size the service formed, and at batch 1.

With ``--rounds N`` the whole sequence of servers runs N times, in reverse order every other
round, so that a slow phase of a shared machine falls on different servers in different rounds.
Each figure is then the median over the rounds, and the goals are judged per round and on the
medians. Prints a table, the CPU the server's processes used, and the ratios. Usage:
``python bench/serving.py [--seconds 5] [--rounds 1] [--levels 1,16,64,256] [--rows 1]
[--protocol v1|v2] [--backend auto|torch|onnxruntime] [--http-workers 0,auto] [--baseline-ref REF]
[--no-peer]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.data import load_dataset  # noqa: E402
from tests.server import children, free_port  # noqa: E402

REPO = ROOT / "model_repository"
MODEL = "digits"


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its descendants (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / tick + sum(tree_cpu_seconds(c) for c, _ in children(pid))


@contextmanager
def running(cmd: list[str], ready_path: str, port: int, env: dict[str, str] | None = None, cwd: Path | None = None,
            log: Path | None = None) -> Iterator[tuple[str, int]]:
    """Run ``cmd`` in its own process group until the block ends; waits until ``ready_path`` answers 200."""
    url = f"http://127.0.0.1:{port}"
    out = open(log or os.devnull, "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited with {proc.returncode}" + (f"; see {log}" if log else ""))
            try:
                if httpx.get(url + ready_path, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{cmd} not ready in 180 s")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


@contextmanager
def baseline_tree(ref: str | None, path: Path) -> Iterator[Path | None]:
    """A detached git worktree of ``ref`` at ``path`` for the block, removed after (``None`` without a ref)."""
    if ref is None:
        yield None
        return
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), ref], check=True, capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], capture_output=True)


PEER = "LitServe"


def flowserve_cmd(port: int, tree: Path | None = None) -> list[str]:
    """The server's command in checkout ``tree`` (default: this one); older checkouts serve from ``models.cli``."""
    entry = "service.cli" if ((tree or ROOT) / "service" / "cli.py").is_file() else "models.cli"
    return [sys.executable, "-m", entry, "serve", "--port", str(port)]


@dataclass(frozen=True)
class Server:
    """One server the benchmark starts, sweeps and stops: ``cmd(port)`` runs it; ``env`` adds to the environment."""

    label: str
    cmd: Callable[[int], list[str]]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    ready: str = "/v2/health/ready"
    score_path: str | None = None  # None: the protocol's own scoring route
    title: str | None = None


async def load_level(url: str, path: str, concurrency: int, seconds: float, rows: int, data: np.ndarray, protocol: str) -> dict:
    """``concurrency`` closed-loop clients for ``seconds``; each request scores ``rows`` rows."""
    import aiohttp

    def chunk(i: int) -> np.ndarray:
        start = (i * rows) % max(1, len(data) - rows)
        return np.resize(data[start:], (rows, *data.shape[1:]))

    if protocol == "v2":  # Open Inference Protocol with Triton's binary tensor extension
        bodies = []
        for i in range(64):
            head = json.dumps({"inputs": [{"name": "input", "datatype": "UINT8", "shape": [rows, *data.shape[1:]],
                                           "parameters": {"binary_data_size": rows * int(np.prod(data.shape[1:]))}}],
                               "parameters": {"seed": i, "binary_data_output": True}}).encode()
            bodies.append((head + chunk(i).astype(np.uint8).tobytes(),
                           {"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}))
    else:
        bodies = [(json.dumps({"instances": chunk(i).tolist(), "seed": i}).encode(), {"content-type": "application/json"}) for i in range(64)]
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                body, headers = bodies[i % 64]
                async with client.post(path, data=body, headers=headers) as r:
                    await r.read()
                    if r.status == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        errors += 1
                i += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    arr = np.array(lat or [float("nan")]) * 1000
    return {"rows_per_s": len(lat) * rows / elapsed, "p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "errors": errors, "requests": len(lat)}


def batch_totals(url: str) -> tuple[float, float]:
    """(rows, batches) executed so far for scoring, from ``/metrics`` (0, 0 for servers without it)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics").text
        families = list(text_string_to_metric_families(text))
    except (httpx.HTTPError, ValueError):
        return 0.0, 0.0
    total = count = 0.0
    for fam in families:
        if fam.name == "flowserve_batch_size_rows":
            for s in fam.samples:
                if s.labels.get("task") == "score" and s.labels.get("model") == MODEL and s.name.endswith("_sum"):
                    total += s.value
                elif s.labels.get("task") == "score" and s.labels.get("model") == MODEL and s.name.endswith("_count"):
                    count += s.value
    return total, count


def sweep(url: str, pid: int, path: str, levels: list[int], seconds: float, rows: int, data: np.ndarray, protocol: str) -> dict[int, dict]:
    out = {}
    for c in levels:
        asyncio.run(load_level(url, path, c, min(1.0, seconds / 4), rows, data, protocol))  # warm
        rows0, batches0 = batch_totals(url)
        cpu0, t0 = tree_cpu_seconds(pid), time.perf_counter()
        out[c] = asyncio.run(load_level(url, path, c, seconds, rows, data, protocol))
        out[c]["server_cores"] = (tree_cpu_seconds(pid) - cpu0) / (time.perf_counter() - t0)
        rows1, batches1 = batch_totals(url)
        out[c]["mean_batch"] = (rows1 - rows0) / (batches1 - batches0) if batches1 > batches0 else float("nan")
        r = out[c]
        print(f"  c={c:4d} {r['rows_per_s']:9.0f} rows/s  p50 {r['p50']:7.1f} ms  p90 {r['p90']:7.1f}  p99 {r['p99']:7.1f}  "
              f"mean batch {r['mean_batch']:5.1f}  server CPU {r['server_cores']:.2f} cores  errors {r['errors']}", flush=True)
    return out


def median_over_rounds(rounds: list[dict[int, dict]]) -> dict[int, dict]:
    """Per level and measure, the median over rounds (each round: ``{level: {measure: value}}``)."""
    return {c: {m: float(np.median([r[c][m] for r in rounds])) for m in rounds[0][c]} for c in rounds[0]}


def peer_goals(ours: dict[int, dict], peer: dict[int, dict]) -> tuple[bool, bool]:
    """(throughput ≥ 2x the peer's at every c ≥ 64, p99 ≤ the peer's at every c)."""
    return (all(ours[c]["rows_per_s"] >= 2 * peer[c]["rows_per_s"] for c in ours if c >= 64),
            all(ours[c]["p99"] <= peer[c]["p99"] for c in ours))


def ratio_cells(ours: dict[int, dict], other: dict[int, dict]) -> str:
    """``c=1: 1.69x, p99 0.59; ...``: our throughput and p99 as ratios to ``other``'s, per level."""
    return "; ".join(f"c={c}: {ours[c]['rows_per_s'] / max(other[c]['rows_per_s'], 1e-9):.2f}x, p99 {ours[c]['p99'] / other[c]['p99']:.2f}"
                     for c in ours)


def in_process(batch: int, seconds: float, data: np.ndarray, backend: str, threads: int) -> dict:
    """Rows/s and latency of the service's own runner called directly at ``batch`` rows (same backend and threads)."""
    import torch

    from service.core.tasks import dequantization_noise
    from service.executor.runners import open_runner
    from service.settings import Settings

    torch.set_num_threads(threads)
    runner = open_runner(REPO / MODEL / "1", "cpu", Settings(backend=backend, batch_invariant=False))
    x = np.resize(data, (batch, *data.shape[1:])).astype(np.float32)
    noise = dequantization_noise(runner.manifest, batch, 0)
    for _ in range(3):
        runner.log_prob(x, noise)
    best, times = 0.0, []
    for _ in range(3):  # best of three: the steady state, as the service's sweep reports its best level
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 3:
            t1 = time.perf_counter()
            runner.log_prob(x, noise)
            times.append(time.perf_counter() - t1)
            n += batch
        best = max(best, n / (time.perf_counter() - t0))
    return {"rows_per_s": best, "p50_ms": float(np.median(times) * 1000)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every server this many times, alternating the order; report medians")
    ap.add_argument("--rows", type=int, default=1, help="rows per request")
    ap.add_argument("--levels", default="1,16,64,256")
    ap.add_argument("--protocol", default="v1", choices=["v1", "v2"], help="v1 JSON, or V2 with binary tensors")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "onnxruntime"], help="FLOWSERVE_BACKEND (auto: the artifact's preferred)")
    ap.add_argument("--http-workers", default="0,auto", help="comma-separated FLOWSERVE_HTTP_WORKERS values to measure; auto = the default")
    ap.add_argument("--baseline-ref", default=None, help="also measure flowserve at this git ref (e.g. the commit before a change)")
    ap.add_argument("--no-peer", action="store_true", help="skip the LitServe peer")
    ap.add_argument("--no-unbatched", action="store_true", help="skip the FLOWSERVE_MAX_BATCH_SIZE=1 run")
    ap.add_argument("--variant-runs", action="store_true", help="also run the default layout with FLOWSERVE_BATCH_INVARIANT=0 "
                    "(and, with --backend torch, FLOWSERVE_TRACE_CPU=0: eager)")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    levels = [int(v) for v in args.levels.split(",")]
    data = load_dataset(MODEL).split("test")
    path = f"/v2/models/{MODEL}/infer" if args.protocol == "v2" else f"/v1/models/{MODEL}/score"
    from service.ipc.children import available_cores, default_http_workers

    cores = available_cores()
    threads = max(1, cores - default_http_workers(1, cores)) if cores > 1 else 1  # the CPU executor's default
    base_env = {"FLOWSERVE_BACKEND": args.backend, "FLOWSERVE_DEVICES": "cpu", "FLOWSERVE_REPOSITORY": str(REPO)}
    per_round: dict[str, list[dict[int, dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp, baseline_tree(args.baseline_ref, Path(tmp) / "baseline") as tree:
        logs = Path(tmp)
        servers: list[Server] = []
        if tree is not None:
            servers.append(Server(f"flowserve @ {args.baseline_ref}", flowserve_cmd, base_env, tree))
        for w in args.http_workers.split(","):
            servers.append(Server(f"flowserve http_workers={w}", flowserve_cmd,
                                  {**base_env, **({} if w == "auto" else {"FLOWSERVE_HTTP_WORKERS": w})}))
        if args.variant_runs:
            servers.append(Server("flowserve batch_invariant=0", flowserve_cmd, {**base_env, "FLOWSERVE_BATCH_INVARIANT": "0"}))
            if args.backend == "torch":
                servers.append(Server("flowserve trace_cpu=0", flowserve_cmd, {**base_env, "FLOWSERVE_TRACE_CPU": "0"}))
        if not args.no_unbatched:
            servers.append(Server("flowserve max_batch_size=1", flowserve_cmd, {**base_env, "FLOWSERVE_MAX_BATCH_SIZE": "1"}))
        if not args.no_peer and args.protocol == "v1":
            def peer_cmd(port: int) -> list[str]:
                return [sys.executable, str(ROOT / "bench" / "litserve_peer.py"), str(REPO / MODEL / "1"), str(port), "256",
                        args.backend, str(threads)]
            servers.append(Server(PEER, peer_cmd, None, None, "/health", "/predict",
                                  f"LitServe peer (max_batch_size 256, {threads} torch thread(s))"))
        for r in range(args.rounds):
            for i, server in enumerate(servers if r % 2 == 0 else servers[::-1]):
                print(f"{server.title or server.label}, {args.rows} row(s) per request, {args.protocol}"
                      + (f", round {r + 1}/{args.rounds}" if args.rounds > 1 else "") + ":", flush=True)
                port = free_port()
                cmd = server.cmd(port, server.cwd) if server.cmd is flowserve_cmd else server.cmd(port)
                with running(cmd, server.ready, port, server.env, server.cwd, logs / f"{r}.{i}.log") as (url, pid):
                    swept = sweep(url, pid, server.score_path or path, levels, args.seconds, args.rows, data, args.protocol)
                per_round.setdefault(server.label, []).append(swept)
    results = {label: median_over_rounds(rounds) for label, rounds in per_round.items()}
    peer = results.get(PEER)

    main_label = next(label for label in results if label.endswith("http_workers=auto"))
    ours = results[main_label]
    sat = max(levels, key=lambda c: ours[c]["rows_per_s"])
    mean_batch = ours[sat]["mean_batch"]
    batch = max(1, int(round(mean_batch))) if np.isfinite(mean_batch) else args.rows
    inproc = in_process(batch, args.seconds, data, args.backend, threads)
    inproc_1 = in_process(args.rows, args.seconds, data, args.backend, threads)
    print()
    print(f"{cores} cores; default layout: 1 executor + {default_http_workers(1, cores)} front-end(s); backend {args.backend}")
    print(f"in-process log_prob at batch {batch}: {inproc['rows_per_s']:.0f} rows/s; at batch {args.rows}: "
          f"{inproc_1['rows_per_s']:.0f} rows/s, p50 {inproc_1['p50_ms']:.2f} ms")
    print(f"service ({main_label}) / in-process at its mean batch ({mean_batch:.1f}) at saturation (c={sat}): "
          f"{ours[sat]['rows_per_s'] / inproc['rows_per_s']:.2f}")
    if len(results) > 1:
        print("\nratios per concurrency (throughput; p99 as ours/theirs, ≤ 1 is better)"
              + (f", medians over {args.rounds} rounds, then each round" if args.rounds > 1 else "") + ":")
    for label in results:
        if label == main_label:
            continue
        print(f"  {main_label} vs {label}: {ratio_cells(ours, results[label])}")
        if args.rounds > 1:
            for r, (mine, theirs) in enumerate(zip(per_round[main_label], per_round[label])):
                verdict = "  (≥ 2x at c ≥ 64: {}; p99 ≤ at every c: {})".format(*peer_goals(mine, theirs)) if label == PEER else ""
                print(f"    round {r + 1}: {ratio_cells(mine, theirs)}{verdict}")
    if peer is not None:
        through, p99 = peer_goals(ours, peer)
        print(f"\ngoals vs the peer{' (medians over rounds)' if args.rounds > 1 else ''}: throughput ≥ 2x at c ≥ 64: {through}; "
              f"p99 ≤ the peer's at every c: {p99}")
    print("\n" + json.dumps({k: {c: {m: round(v, 2) for m, v in r.items()} for c, r in res.items()} for k, res in results.items()}))


if __name__ == "__main__":
    main()
