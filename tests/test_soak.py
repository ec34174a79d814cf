"""Soak and fault tests (``slow``; ``make test-all``). Each has a fixed time bound and prints its figures.

* overload: twice the measured saturation rate, open loop, for five minutes: every answer is 200,
  or 503 with Retry-After; the server's RSS grows < 5% after warm-up;
* a corrupted artifact dropped into the repository during a reload, under load: that model reports
  failed with its reason, the others keep serving, no request is lost;
* clients that disconnect mid-request: the server never crashes, and their work leaves the queue.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from models.data import load_dataset
from tests.server import metric_value, running_server, tree_rss_bytes, wait_for_metric

pytestmark = pytest.mark.slow
TEST = load_dataset("digits").split("test")
BODIES = [json.dumps({"instances": TEST[i : i + 1].tolist(), "seed": i}).encode() for i in range(64)]
SOAK_SECONDS = int(os.environ.get("FLOWSERVE_SOAK_SECONDS", "300"))  # shorter for a quick look, never in CI
WARMUP_SECONDS = 60


async def closed_loop(url: str, concurrency: int, seconds: float) -> float:
    """Saturation: requests/s answered 200 by ``concurrency`` closed-loop clients."""
    import aiohttp

    done = 0
    stop = time.perf_counter() + seconds
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=concurrency)) as client:
        async def worker(k: int) -> None:
            nonlocal done
            while time.perf_counter() < stop:
                async with client.post("/v1/models/digits/score", data=BODIES[k % 64], headers={"content-type": "application/json"}) as r:
                    await r.read()
                    done += r.status == 200
                k += concurrency

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return done / (time.perf_counter() - t0)


async def open_loop(url: str, rate: float, seconds: float, on_tick=None, max_inflight: int = 2048) -> dict:  # noqa: ANN001
    """Requests launched at ``rate``/s whatever the answers, for ``seconds``; tallies the answers.

    At most ``max_inflight`` are outstanding: an arrival that finds them all busy is counted as
    ``not_sent`` (the server is then answering slower than the offered rate).
    """
    import aiohttp

    tally: dict = {"offered": 0, "sent": 0, "not_sent": 0, "200": 0, "503": 0, "503_without_retry_after": 0, "other": 0,
                   "connection_errors": 0}
    inflight = 0
    async with aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=max_inflight),
                                     timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def one(i: int) -> None:
            nonlocal inflight
            try:
                async with client.post("/v1/models/digits/score", data=BODIES[i % 64], headers={"content-type": "application/json"}) as r:
                    await r.read()
                    if r.status == 200:
                        tally["200"] += 1
                    elif r.status == 503:
                        tally["503"] += 1
                        tally["503_without_retry_after"] += "retry-after" not in r.headers
                    else:
                        tally["other"] += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                tally["connection_errors"] += 1
            finally:
                inflight -= 1

        tasks = set()
        t0 = time.perf_counter()
        next_tick = t0
        while (now := time.perf_counter()) < t0 + seconds:
            due = int((now - t0) * rate)
            while tally["offered"] < due:
                tally["offered"] += 1
                if inflight >= max_inflight:
                    tally["not_sent"] += 1
                    continue
                inflight += 1
                tally["sent"] += 1
                task = asyncio.create_task(one(tally["offered"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if on_tick is not None and now >= next_tick:
                on_tick(now - t0)
                next_tick += 1.0
            await asyncio.sleep(0.002)
        await asyncio.gather(*tasks)
    tally["seconds"] = seconds
    return tally


def test_twice_saturation_for_five_minutes(repository: Path, tmp_path: Path) -> None:
    env = {"FLOWSERVE_MAX_QUEUE_ROWS": "512", "FLOWSERVE_REQUEST_TIMEOUT_S": "10"}
    with running_server(repository, tmp_path, **env) as s:
        saturation = asyncio.run(closed_loop(s.url, 64, 10))
        rss: dict[str, int] = {}
        series: list[int] = []

        def tick(t: float) -> None:
            if int(t) % 15 == 0:
                series.append(tree_rss_bytes(s.proc.pid) // 2**20)
            if t >= WARMUP_SECONDS and "warm" not in rss:
                rss["warm"] = tree_rss_bytes(s.proc.pid)

        tally = asyncio.run(open_loop(s.url, 2 * saturation, SOAK_SECONDS, tick))
        rss["end"] = tree_rss_bytes(s.proc.pid)
        print(f"\nsoak: saturation {saturation:.0f} req/s, offered {2 * saturation:.0f} req/s for {SOAK_SECONDS} s: {tally}; "
              f"RSS after warm-up {rss['warm'] / 2**20:.1f} MiB, at end {rss['end'] / 2**20:.1f} MiB; every 15 s (MiB): {series}")
        assert tally["other"] == 0 and tally["connection_errors"] == 0 and tally["503_without_retry_after"] == 0, tally
        assert tally["200"] + tally["503"] == tally["sent"] and tally["200"] > 0
        assert rss["end"] < 1.05 * rss["warm"], rss
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200


def _corrupt(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    w = dst / "weights.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    w.write_bytes(bytes(raw))


def test_corrupted_artifact_during_reload_loses_no_request(repository: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    shutil.copytree(repository / "digits", repo / "steady")
    with running_server(repo, tmp_path) as s:
        codes: list[int] = []
        stop = threading.Event()

        def load(model: str) -> None:
            with s.client() as c:
                i = 0
                while not stop.is_set():
                    codes.append(c.post(f"/v1/models/{model}/score", content=BODIES[i % 64], headers={"content-type": "application/json"}).status_code)
                    i += 1

        threads = [threading.Thread(target=load, args=(m,)) for m in ("digits", "steady", "digits")]
        for t in threads:
            t.start()
        wait_for_metric(s, "flowserve_requests_total", lambda v: v >= 20, status="200")
        _corrupt(repo / "digits" / "1", repo / "digits" / "2")  # a bad new version of a served model
        _corrupt(repo / "digits" / "1", repo / "newcomer" / "1")  # a bad new model
        shutil.copytree(repo / "digits" / "1", repo / "fresh" / "1")  # and a good one
        with s.client() as c:
            changes = c.post("/v1/repository/reload").json()["changes"]
            served = c.post("/v1/models/fresh/score", content=BODIES[0], headers={"content-type": "application/json"}).status_code
            models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        stop.set()
        for t in threads:
            t.join(30)
        print(f"\nreload under load: {len(codes)} requests, codes {sorted(set(codes))}; changes {changes}")
        assert set(codes) == {200} and len(codes) > 20
        assert "kept version 1" in changes["digits"] and "checksum" in changes["digits"]
        assert models["digits"]["version"] == "1" and models["digits"]["state"] == "ready"
        assert models["newcomer"]["state"] == "failed" and "checksum" in models["newcomer"]["reason"]
        assert models["fresh"]["state"] == "ready" and served == 200


def test_clients_that_disconnect_mid_request(repository: Path, tmp_path: Path) -> None:
    with running_server(repository, tmp_path, FLOWSERVE_MAX_BATCH_SIZE="1", FLOWSERVE_MAX_QUEUE_ROWS="8192") as s:
        big = json.dumps({"instances": TEST[:256].tolist(), "iw_samples": 16}).encode()  # 4,096 rows in 4,096 batches
        request = (f"POST /v1/models/digits/score HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   f"content-length: {len(big)}\r\n\r\n").encode() + big
        dropped = 0
        for _ in range(6):  # two of these would fill the queue (8,192 rows) if their work stayed queued
            with socket.create_connection(("127.0.0.1", s.port), timeout=30) as conn:
                conn.sendall(request)
                wait_for_metric(s, "flowserve_inflight_requests", lambda v: v > 0)  # being computed, in chunks
            dropped += 1  # the client left mid-request: the server stops its work and frees its queue share
            wait_for_metric(s, "flowserve_inflight_requests", lambda v: v == 0, timeout_s=30)
        assert dropped == 6
        with s.client() as c:
            ok = c.post("/v1/models/digits/score", content=BODIES[0], headers={"content-type": "application/json"})
        assert ok.status_code == 200 and s.proc.poll() is None
        wait_for_metric(s, "flowserve_inflight_requests", lambda v: v == 0, timeout_s=120)
        assert metric_value(s, "flowserve_queue_depth_rows", model="digits", task="score") == 0
        assert metric_value(s, "flowserve_requests_total", status="499") == 6  # counted as client-closed, not as errors
        assert metric_value(s, "flowserve_requests_total", status="500") == 0
        print(f"\ndisconnects: {dropped} clients gave up mid-request; the server stayed up, its queue drained, later requests served")
