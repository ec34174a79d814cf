"""Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor extension.

Scoring model: input ``input`` ``[-1, *shape]`` (any numeric datatype) → outputs ``log_prob``
(FP64, nats) and ``bits_per_dim`` (FP64), ``[-1]``. Request parameter ``seed`` seeds the
dequantization noise.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response

from models.artifact import flowserve_version

from ..errors import BadRequest, NotFound
from ..repository import ModelEntry
from .deps import require_key, state
from .inputs import check_values, parse_json, read_body
from .v1 import score_rows

router = APIRouter(prefix="/v2", tags=["v2"])

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64), "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
HEADER = "inference-header-content-length"


@router.get("")
async def server_metadata() -> dict:
    return {"name": "flowserve", "version": flowserve_version(), "extensions": ["binary_tensor_data", "model_repository"]}


@router.get("/health/live")
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready")
async def ready(request: Request) -> Response:
    s = state(request)
    ok = not s.draining and s.repository.loaded_once.is_set()
    body = {"ready": ok}
    if not ok:
        body["error"] = "server is shutting down" if s.draining else "models are still loading"
    return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")


def _metadata(request: Request, name: str, version: str | None) -> ModelEntry:
    """The served entry for ``name``; 404 when a different version is asked for."""
    entry = state(request).repository.get(name)
    if version is not None and version != entry.version:
        raise NotFound(f"model {name!r} has no loaded version {version!r} (serving {entry.version})")
    return entry


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
    entry = _metadata(request, name, version)
    meta: dict[str, Any] = {"name": name, "versions": [entry.version], "platform": f"flowserve_{entry.runners[0].backend}" if entry.runners else "flowserve"}
    if entry.manifest is not None:
        shape = [-1, *entry.manifest.data_spec.shape]
        meta["inputs"] = [{"name": "input", "datatype": "FP32", "shape": shape}]
        meta["outputs"] = [{"name": "log_prob", "datatype": "FP64", "shape": [-1]}, {"name": "bits_per_dim", "datatype": "FP64", "shape": [-1]}]
    if not entry.ready:
        meta["error"] = entry.reason or entry.state
    return meta


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    entry = _metadata(request, name, version)
    body = {"name": name, "ready": entry.ready}
    if not entry.ready:
        body["error"] = entry.reason or entry.state
    return Response(json.dumps(body), status_code=200 if entry.ready else 503, media_type="application/json")


def _decode_input(spec: dict, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    name = spec.get("name", "?")
    dtype_name, shape = spec.get("datatype"), spec.get("shape")
    if dtype_name not in DTYPES:
        raise BadRequest(f"inputs.{name}.datatype: {dtype_name!r} is not supported; use one of {', '.join(DTYPES)}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise BadRequest(f"inputs.{name}.shape: expected a list of non-negative integers")
    dtype = DTYPES[dtype_name]
    count = math.prod(shape)
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise BadRequest(f"inputs.{name}: binary_data_size {size} does not match shape {shape} of {dtype_name} or the body")
        arr = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset).reshape(shape)
        return arr, offset + size
    data = spec.get("data")
    if data is None:
        raise BadRequest(f"inputs.{name}: no 'data' and no binary_data_size")
    try:
        arr = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"inputs.{name}.data: values do not fit datatype {dtype_name}") from None
    if arr.size != count:
        raise BadRequest(f"inputs.{name}.data: {arr.size} values for shape {shape}")
    return arr.reshape(shape), offset


@router.post("/models/{name}/infer", dependencies=[Depends(require_key)])
@router.post("/models/{name}/versions/{version}/infer", dependencies=[Depends(require_key)])
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    s = state(request)
    entry = _metadata(request, name, version)
    entry.batcher("score")
    body = await read_body(request, s.settings.max_body_bytes)
    header_len = request.headers.get(HEADER)
    if header_len is not None:
        if not header_len.isdigit() or int(header_len) > len(body):
            raise BadRequest(f"{HEADER}: {header_len!r} is not a length within the body")
        head, binary = body[: int(header_len)], body[int(header_len) :]
    else:
        head, binary = body, b""
    req = parse_json(head)
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list) or len(req["inputs"]) != 1:
        raise BadRequest("inputs: expected exactly one input tensor named 'input'")
    params = req.get("parameters") or {}
    seed = params.get("seed", 0)
    if not isinstance(seed, int) or seed < 0:
        raise BadRequest("parameters.seed: expected a non-negative integer")
    arr, _ = _decode_input(req["inputs"][0], binary, 0)
    x = check_values(arr.astype(np.float64), entry.manifest.data_spec, f"inputs.{req['inputs'][0].get('name', 'input')}")
    lp, entry = await score_rows(request, name, x, seed, 1)
    bpd = -lp / (entry.manifest.data_spec.dims * math.log(2))
    outputs = {"log_prob": lp.astype(np.float64), "bits_per_dim": bpd.astype(np.float64)}
    requested = req.get("outputs")
    binary_default = bool(params.get("binary_data_output", False))
    wanted = [(o.get("name"), bool((o.get("parameters") or {}).get("binary_data", binary_default))) for o in requested] if requested else [(k, binary_default) for k in outputs]
    out_json, blobs = [], []
    for oname, as_binary in wanted:
        if oname not in outputs:
            raise BadRequest(f"outputs: unknown output {oname!r}; available: {', '.join(outputs)}")
        t = outputs[oname]
        o: dict[str, Any] = {"name": oname, "datatype": "FP64", "shape": list(t.shape)}
        if as_binary:
            raw = t.astype("<f8").tobytes()
            o["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            o["data"] = t.tolist()
        out_json.append(o)
    resp = {"model_name": name, "model_version": entry.version, "outputs": out_json}
    if "id" in req:
        resp["id"] = req["id"]
    head_bytes = json.dumps(resp).encode()
    if not blobs:
        return Response(head_bytes, media_type="application/json")
    return Response(head_bytes + b"".join(blobs), media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(len(head_bytes))})
