"""The service end to end: a real uvicorn process on loopback, real HTTP, real tritonclient."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models import load
from models.data import load_dataset
from tests.server import Server, metric_samples, metric_value, running_server, wait_for_metric

TEST = load_dataset("digits").split("test")


def score(client: httpx.Client, rows: np.ndarray, seed: int = 0, **extra) -> httpx.Response:  # noqa: ANN003
    return client.post("/v1/models/digits/score", json={"instances": rows.tolist(), "seed": seed, **extra})


def test_health_and_metadata(server: Server) -> None:
    with server.client() as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").status_code == 200
        assert c.get("/v2").json()["name"] == "flowserve"
        meta = c.get("/v2/models/digits").json()
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        assert c.get("/v2/models/digits/ready").status_code == 200
        broken = c.get("/v2/models/broken/ready")
        assert broken.status_code == 503 and "error" in broken.json()


def test_model_list_reports_broken_model_with_reason(server: Server) -> None:
    with server.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert models["digits"]["state"] == "ready" and models["digits"]["data_spec"]["levels"] == 17
        assert models["digits"]["execution"]["score"].endswith("; batches wait up to 5.0 ms")  # the executor's batcher, as a front-end tells it
        assert models["broken"]["state"] == "failed" and "manifest" in models["broken"]["reason"]
        r = c.post("/v1/models/broken/score", json={"instances": [[0]]})
        assert r.status_code == 503 and "not ready" in r.json()["error"]


def test_score_matches_in_process_model(server: Server, repository: Path) -> None:
    model = load(str(repository / "digits" / "1"))
    rows = TEST[:5]
    with server.client() as c:
        r = score(c, rows, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["unit"] == "nats" and body["bound"] == "variational"
    got = np.array([x["log_prob"] for x in body["results"]])
    want = model.log_prob(torch.from_numpy(rows), seed=7).detach().numpy()  # the same seeded noise as the service
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
    bpd = [x["bits_per_dim"] for x in body["results"]]
    np.testing.assert_allclose(bpd, -got / (64 * math.log(2)), rtol=1e-9)


def test_batched_results_equal_solo_results(server: Server) -> None:
    probe = TEST[:3]
    with server.client() as c:
        solo_r = score(c, probe, seed=11)
        solo_s = c.post("/v1/models/digits/sample", json={"n": 3, "seed": 5, "temperature": 0.8})
    assert solo_r.status_code == 200 and solo_s.status_code == 200, (solo_r.text, solo_s.text)
    solo, solo_samples = solo_r.json()["results"], solo_s.json()["samples"]

    async def crowd() -> tuple[list, list]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
            others = [ac.post("/v1/models/digits/score", json={"instances": TEST[i : i + 4].tolist(), "seed": i}) for i in range(60)]
            mine = ac.post("/v1/models/digits/score", json={"instances": probe.tolist(), "seed": 11})
            sample_others = [ac.post("/v1/models/digits/sample", json={"n": 4, "seed": i}) for i in range(20)]
            mine_s = ac.post("/v1/models/digits/sample", json={"n": 3, "seed": 5, "temperature": 0.8})
            res = await asyncio.gather(mine, mine_s, *others, *sample_others)
            assert all(r.status_code == 200 for r in res), [r.text for r in res if r.status_code != 200][:3]
            return res[0].json()["results"], res[1].json()["samples"]

    batches = metric_value(server, "flowserve_batch_size_rows_count", model="digits", task="score")
    rows = metric_value(server, "flowserve_batch_size_rows_sum", model="digits", task="score")
    batched, batched_samples = asyncio.run(crowd())
    assert batched == solo
    assert batched_samples == solo_samples
    new_batches = metric_value(server, "flowserve_batch_size_rows_count", model="digits", task="score") - batches
    new_rows = metric_value(server, "flowserve_batch_size_rows_sum", model="digits", task="score") - rows
    assert new_rows == 3 + 60 * 4 and new_batches < 61, (new_batches, new_rows)  # some requests shared a batch


def test_hundreds_of_concurrent_requests_all_answered(server: Server) -> None:
    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as ac:
            reqs = [ac.post("/v1/models/digits/score", json={"instances": TEST[i % 200 : i % 200 + 2].tolist(), "seed": i}) for i in range(400)]
            return [r.status_code for r in await asyncio.gather(*reqs)]

    codes = asyncio.run(flood())
    assert codes.count(200) == 400


def test_iw_bound_and_uploads(server: Server) -> None:
    from PIL import Image

    with server.client() as c:
        iw = score(c, TEST[:2], iw_samples=32).json()
        assert iw["bound"] == "iw" and iw["iw_samples"] == 32
        buf = io.BytesIO()
        np.save(buf, TEST[:3])
        r = c.post("/v1/models/digits/score", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert r.status_code == 200 and len(r.json()["results"]) == 3
        bad = c.post("/v1/models/digits/score?seed=abc", content=buf.getvalue(), headers={"content-type": "application/x-npy"})
        assert bad.status_code == 400 and "seed" in bad.json()["error"]
        nan = io.BytesIO()
        np.save(nan, np.full((1, 1, 8, 8), np.nan))
        bad = c.post("/v1/models/digits/score", content=nan.getvalue(), headers={"content-type": "application/x-npy"})
        assert bad.status_code == 400 and "NaN" in bad.json()["error"]
        png = io.BytesIO()
        Image.fromarray((TEST[0, 0] * 255 // 16).astype(np.uint8)).save(png, format="PNG")
        r = c.post("/v1/models/digits/score", content=png.getvalue(), headers={"content-type": "image/png"})
        assert r.status_code == 200 and len(r.json()["results"]) == 1


def test_samples_match_in_process_model_for_a_seed(server: Server, repository: Path) -> None:
    model = load(str(repository / "digits" / "1"))
    with server.client() as c:
        got = c.post("/v1/models/digits/sample", json={"n": 3, "temperature": 0.7, "seed": 4}).json()["samples"]
    assert got == model.sample(3, 0.7, seed=4).long().tolist()


def test_sample_json_and_png(server: Server) -> None:
    with server.client() as c:
        r = c.post("/v1/models/digits/sample", json={"n": 4, "temperature": 0.7, "seed": 1})
        x = np.array(r.json()["samples"])
        assert x.shape == (4, 1, 8, 8) and x.min() >= 0 and x.max() <= 16
        r = c.post("/v1/models/digits/sample", json={"n": 16}, headers={"accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.content[:4] == b"\x89PNG"


BAD_REQUESTS = [
    ("malformed json", "/v1/models/digits/score", b"{not json", 400),
    ("wrong shape", "/v1/models/digits/score", json.dumps({"instances": [[1, 2, 3]]}).encode(), 400),
    ("wrong dtype", "/v1/models/digits/score", json.dumps({"instances": [[["a"] * 8] * 8]}).encode(), 400),
    ("nan", "/v1/models/digits/score", b'{"instances": [[' + b",".join([b"[NaN,0,0,0,0,0,0,0]"] * 8) + b"]]}", 400),
    ("out of range", "/v1/models/digits/score", json.dumps({"instances": [[[17] * 8] * 8]}).encode(), 400),
    ("not an integer level", "/v1/models/digits/score", json.dumps({"instances": [[[0.5] * 8] * 8]}).encode(), 400),
    ("unknown model", "/v1/models/nope/score", json.dumps({"instances": [[[0] * 8] * 8]}).encode(), 404),
    ("unknown field", "/v1/models/digits/score", json.dumps({"instances": [[[0] * 8] * 8], "sed": 1}).encode(), 400),
    ("too many samples", "/v1/models/digits/sample", json.dumps({"n": 10**6}).encode(), 400),
    ("negative temperature", "/v1/models/digits/sample", json.dumps({"temperature": -1}).encode(), 400),
    ("v2 wrong datatype", "/v2/models/digits/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "BYTES", "data": ["x"]}]}).encode(), 400),
    ("v2 wrong shape", "/v2/models/digits/infer", json.dumps({"inputs": [{"name": "input", "shape": [1, 8, 8, 2], "datatype": "FP32", "data": [0] * 128}]}).encode(), 400),
    ("v2 no inputs", "/v2/models/digits/infer", b"{}", 400),
    ("unknown route", "/v1/nothing", b"{}", 404),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_matrix(server: Server, case: tuple) -> None:
    _, path, body, status = case
    with server.client() as c:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and r.json()["error"]


def test_limits_auth_and_oversized_body(repository: Path, tmp_path: Path) -> None:
    env = {"FLOWSERVE_API_KEYS": "k1,k2", "FLOWSERVE_MAX_BODY_BYTES": "4096", "FLOWSERVE_MAX_SAMPLES": "8"}
    with running_server(repository, tmp_path, **env) as s, s.client() as c:
        row = {"instances": TEST[:1].tolist()}
        r = c.post("/v1/models/digits/score", json=row)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "error" in r.json()
        assert c.post("/v1/models/digits/score", json=row, headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = {"authorization": "Bearer k2"}
        assert c.post("/v1/models/digits/score", json=row, headers=ok).status_code == 200
        big = c.post("/v1/models/digits/score", json={"instances": TEST[:40].tolist()}, headers=ok)
        assert big.status_code == 413 and "limit" in big.json()["error"]
        assert c.post("/v1/models/digits/sample", json={"n": 9}, headers=ok).status_code == 400
        assert c.get("/v2/health/ready").status_code == 200  # health needs no key
        assert c.get("/metrics").status_code == 200


def test_metrics_parse(server: Server) -> None:
    with server.client() as c:
        score(c, TEST[:2])
        text = c.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("flowserve_requests", "flowserve_request_duration_seconds", "flowserve_queue_duration_seconds",
                 "flowserve_compute_duration_seconds", "flowserve_batch_size_rows", "flowserve_queue_depth_rows",
                 "flowserve_rejections", "flowserve_model_ready", "flowserve_model_load_duration_seconds"):
        assert name in families, name
    ok = [s for s in families["flowserve_requests"].samples
          if s.labels.get("model") == "digits" and s.labels.get("status") == "200" and s.name.endswith("_total")]
    assert ok and sum(s.value for s in ok) >= 1
    ready = {s.labels["model"]: s.value for s in families["flowserve_model_ready"].samples}
    assert ready == {"digits": 1.0, "broken": 0.0}


def test_tritonclient_binary_and_json(server: Server) -> None:
    import tritonclient.http as httpclient

    rows = TEST[:4].astype(np.float32)
    with server.client() as c:
        want = [x["log_prob"] for x in score(c, TEST[:4], seed=0).json()["results"]]
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    assert client.get_model_metadata("digits")["inputs"][0]["name"] == "input"
    for binary in (True, False):
        inp = httpclient.InferInput("input", list(rows.shape), "FP32")
        inp.set_data_from_numpy(rows, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("log_prob", binary_data=binary)]
        res = client.infer("digits", [inp], outputs=outputs)
        np.testing.assert_allclose(res.as_numpy("log_prob"), want, rtol=1e-6)
    res = client.infer("digits", [inp])  # no outputs named: binary_data_output
    np.testing.assert_allclose(res.as_numpy("bits_per_dim"), -np.array(want) / (64 * math.log(2)), rtol=1e-6)
    client.close()
    # the binary part holds exactly the tensors the header declares: stray bytes are a client bug, not padding
    raw = rows.tobytes()
    head = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(rows.shape),
                                   "parameters": {"binary_data_size": len(raw)}}]}).encode()
    with server.client() as c:
        for extra, status in ((b"", 200), (b"\0\0", 400)):
            r = c.post("/v2/models/digits/infer", content=head + raw + extra,
                       headers={"Inference-Header-Content-Length": str(len(head)), "content-type": "application/octet-stream"})
            assert r.status_code == status, r.text
    assert "2 bytes after the JSON header" in r.json()["error"]


def test_reload_swaps_in_new_version(repository: Path, tmp_path: Path) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(repository / "digits", repo / "digits")
    with running_server(repo, tmp_path) as s, s.client() as c:
        assert c.get("/v1/models/digits").json()["version"] == "1"
        shutil.copytree(repo / "digits" / "1", repo / "digits" / "2")
        r = c.post("/v1/repository/reload")
        assert r.status_code == 200 and "version 2" in r.json()["changes"]["digits"]
        assert c.get("/v1/models/digits").json()["version"] == "2"
        assert score(c, TEST[:1]).status_code == 200
        import signal

        shutil.copytree(repo / "digits" / "1", repo / "digits" / "3")
        s.proc.send_signal(signal.SIGHUP)
        wait_for_metric(s, "flowserve_model_ready", lambda v: v == 1, model="digits", version="3")
        assert c.get("/v1/models/digits").json()["version"] == "3"
        assert score(c, TEST[:1]).status_code == 200


def test_queue_full_and_timeout_answer_503_never_5xx(repository: Path, tmp_path: Path) -> None:
    env = {"FLOWSERVE_MAX_QUEUE_ROWS": "8", "FLOWSERVE_MAX_BATCH_SIZE": "2"}
    with running_server(repository, tmp_path, **env) as s:
        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as ac:
                return await asyncio.gather(*(ac.post("/v1/models/digits/score", json={"instances": TEST[:4].tolist(), "seed": i}) for i in range(60)))

        res = asyncio.run(flood())
        codes = [r.status_code for r in res]
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes
        full = next(r for r in res if r.status_code == 503)
        assert "queue" in full.json()["error"] and int(full.headers["retry-after"]) >= 1
        with s.client() as c:
            text = c.get("/metrics").text
        rejected = [x for f in text_string_to_metric_families(text) if f.name == "flowserve_rejections" for x in f.samples
                    if x.labels.get("reason") == "queue_full" and x.name.endswith("_total")]
        assert rejected and rejected[0].value == codes.count(503)
    with running_server(repository, tmp_path, FLOWSERVE_REQUEST_TIMEOUT_S="0.000001") as s, s.client() as c:
        r = c.post("/v1/models/digits/score", json={"instances": TEST[:64].tolist()})
        assert r.status_code == 503 and "timed out" in r.json()["error"]


def test_sigterm_drains_in_flight_requests(repository: Path, tmp_path: Path) -> None:
    import signal
    import threading

    with running_server(repository, tmp_path, FLOWSERVE_MAX_BATCH_SIZE="8") as s:
        results: list[int] = []

        def client() -> None:
            with s.client() as c:
                results.append(c.post("/v1/models/digits/score", json={"instances": TEST[:200].tolist(), "iw_samples": 8}).status_code)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        wait_for_metric(s, "flowserve_inflight_requests", lambda v: v == 4)  # all four accepted, none finished
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5  # the supervisor passes SIGTERM on to the front-ends: readiness turns at once
        while (ready := httpx.get(f"{s.url}/v2/health/ready", timeout=10)).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.status_code == 503 and "shutting down" in ready.json()["error"]  # 1,600 rows each are still running
        late = httpx.post(f"{s.url}/v1/models/digits/score", json={"instances": TEST[:1].tolist()}, timeout=10)
        assert late.status_code == 503 and late.headers["retry-after"]
        for t in threads:
            t.join(60)
        assert results == [200, 200, 200, 200]
        assert s.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the captured signal


def test_unknown_model_names_do_not_grow_the_metrics(server: Server) -> None:
    """Label cardinality is bounded: any number of unknown names share one ``model`` label value."""
    import random

    def series() -> int:
        text = httpx.get(f"{server.url}/metrics").text
        return sum(len(f.samples) for f in text_string_to_metric_families(text))

    rng = random.Random(0)
    names = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=12)) for _ in range(1000)]
    routes = ("/v1/models/{}/score", "/v1/models/{}/sample", "/v1/models/{}/anomaly", "/v2/models/{}/infer")
    with server.client() as c:
        for route in routes:  # the unknown label's series for each endpoint exist from now on
            c.post(route.format("warm-up"), json={})
        before = series()
        for i, name in enumerate(names):
            assert c.post(routes[i % 4].format(name), json={}).status_code == 404
        after = series()
    print(f"metric samples before and after {len(names)} random model names: {before}, {after}")
    assert after == before, (before, after)
    labels = {s.labels.get("model") for s in metric_samples(server, "flowserve_requests")}
    assert labels <= {"digits", "broken", "_unknown"} and "_unknown" in labels


def test_request_ids_are_echoed_or_made(server: Server) -> None:
    with server.client() as c:
        r = c.get("/v2/health/live", headers={"x-request-id": "abc-123"})
        assert r.headers["x-request-id"] == "abc-123"
        assert len(c.get("/v2/health/live", headers={"x-request-id": "bad id with spaces"}).headers["x-request-id"]) == 32


def test_api_keys_guard_every_inference_reload_and_upload_route(repository: Path, tmp_path: Path) -> None:
    """With keys on, no POST route of the app answers without a key: 0 successes, every answer a 401
    (routes enumerated from the app's own OpenAPI document, which FastAPI builds from its routes)."""
    from service.server import create_app
    from service.settings import Settings

    paths = [p for p, ops in create_app(Settings(devices=["cpu"])).openapi()["paths"].items() if "post" in ops]
    assert len(paths) >= 6
    with running_server(repository, tmp_path, FLOWSERVE_API_KEYS="k1") as s, s.client() as c:
        for route in paths:
            path = route.replace("{name}", "digits").replace("{version}", "1")
            for body, ctype in ((b'{"instances": [[0]], "n": 1, "records": [[0]], "inputs": []}', "application/json"),
                                (b"\x89PNG", "image/png"), (b"\x93NUMPY", "application/x-npy")):
                for auth in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic k1"}):
                    r = c.post(path, content=body, headers={"content-type": ctype, **auth})
                    assert r.status_code == 401 and r.json()["error"], (path, ctype, auth, r.status_code)
        assert c.post("/v1/repository/reload", headers={"authorization": "Bearer k1"}).status_code == 200


def test_a_repository_without_models_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A mistyped ``--repository`` serves nothing, so the log says why: missing, or holding no ``<name>/<version>/``."""
    from service.executor.repository import ModelRepository
    from service.metrics import Metrics
    from service.settings import Settings

    (tmp_path / "empty" / "digits" / "latest").mkdir(parents=True)  # a version must be a number
    for root, words in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "holds no model")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="service.executor.repository"):
            assert ModelRepository(Settings(repository=root), [], Metrics()).scan() == {}
        assert any(words in r.getMessage() for r in caplog.records), caplog.text
