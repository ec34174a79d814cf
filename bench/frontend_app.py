"""The HTTP front-end's app alone: CPU per request through the ASGI app, in-process, side by side.

What a front-end process spends on a request between uvicorn and the executor: the real app
(:func:`service.frontend.app.build_app`: middleware, routes, codecs, the inference core) over the bundled digits
manifest, with a repository whose batcher answers at once instead of an executor, so the model, the
transport and the socket are left out. Two builds of the same app, interleaved:

* ``CodecRoute`` (the default): the codecs' routes on the app's router, called directly
  (:class:`service.frontend.api.routing.CodecRoute`);
* ``FastAPI handler``: the same endpoints as plain ``APIRoute``\\ s under ``include_router``, FastAPI's
  standard path (as the service was before ``CodecRoute``).

Requests: a 1-row v1 ``score`` (JSON) and a 1-row V2 ``infer`` (JSON tensors). Prints µs per
request (best of ``--rounds`` rounds of ``--requests`` each) and the ratio.
Usage: ``python bench/frontend_app.py [--rounds 7] [--requests 1500]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import numpy as np
import orjson
from fastapi import APIRouter, FastAPI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.artifacts.manifest import read_manifest  # noqa: E402
from service.core.entry import ModelEntry  # noqa: E402
from service.frontend.api.routing import CodecRoute  # noqa: E402
from service.frontend.app import build_app  # noqa: E402
from service.metrics import Metrics  # noqa: E402
from service.settings import Settings  # noqa: E402

MODEL = ROOT / "model_repository" / "digits" / "1"


class AnswerAtOnce:
    """A batcher whose rows score -90 nats at once (no executor, no model)."""

    async def submit(self, payload: dict, timeout_s: float, gone=None) -> np.ndarray:  # noqa: ANN001
        return np.full(len(next(iter(payload.values()))), -90.0)


class OneModelRepository:
    """The bundled digits manifest, ready, behind :class:`AnswerAtOnce`."""

    def __init__(self) -> None:
        entry = ModelEntry(name="digits", version="1", path=MODEL, state="ready", manifest=read_manifest(str(MODEL)))
        entry.batchers = {"score": AnswerAtOnce()}
        self.models = {"digits": entry}

    def get(self, name: str) -> ModelEntry:
        return self.models[name]

    def not_ready_reason(self) -> None:
        return None


def app(codec_routes: bool) -> FastAPI:
    async def start(service) -> list:  # noqa: ANN001
        return []

    async def stop() -> None:
        pass

    built = build_app(Settings(), Metrics(), OneModelRepository(), start, stop)
    if not codec_routes:  # the same endpoints through FastAPI's standard path
        routes = [r for r in built.router.routes if isinstance(r, CodecRoute)]
        router = APIRouter()
        for r in routes:
            built.router.routes.remove(r)
            router.add_api_route(r.path, r.endpoint, methods=sorted(r.methods), response_model=r.response_model,
                                 response_model_exclude_none=r.response_model_exclude_none, status_code=r.status_code,
                                 responses=r.responses, openapi_extra=r.openapi_extra)
        built.include_router(router)
    return built


def requests() -> dict[str, tuple[str, bytes]]:
    image = (np.arange(64).reshape(1, 1, 8, 8) % 17).tolist()
    return {
        "v1 score, 1 row": ("/v1/models/digits/score", orjson.dumps({"instances": image, "seed": 3})),
        "v2 infer, 1 row": ("/v2/models/digits/infer", orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 8, 8],
                                                                                 "data": sum(sum(image[0], []), [])}]})),
    }


async def per_request_us(target: FastAPI, path: str, body: bytes, n: int) -> float:
    """Seconds per request through ``target`` (ASGI, in-process), in µs."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"bench"), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    status: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    t0 = time.perf_counter()
    for _ in range(n):
        await target(dict(scope), receive, send)
    elapsed = time.perf_counter() - t0
    if set(status) != {200}:
        raise RuntimeError(f"{path}: statuses {sorted(set(status))}")
    return elapsed / n * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=1500)
    args = ap.parse_args()
    apps = {"CodecRoute": app(True), "FastAPI handler": app(False)}
    for label, (path, body) in requests().items():
        best = {name: float("inf") for name in apps}
        for name, target in apps.items():  # warm-up
            await per_request_us(target, path, body, 100)
        for _ in range(args.rounds):
            for name, target in apps.items():
                best[name] = min(best[name], await per_request_us(target, path, body, args.requests))
        cells = "  ".join(f"{name} {us:6.1f} µs" for name, us in best.items())
        print(f"{label}: {cells}  ratio {best['FastAPI handler'] / best['CodecRoute']:.2f}x", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
