"""Open Inference Protocol (KServe V2) over REST, with Triton's binary tensor extension: a thin
codec over :mod:`service.core`.

Scoring model: input ``input`` ``[-1, *shape]`` (any numeric datatype) → outputs ``log_prob``
(FP64, nats) and ``bits_per_dim`` (FP64), ``[-1]``. Request parameter ``seed`` seeds the
dequantization noise. Extensions implemented: ``binary_tensor_data`` only.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from models.artifacts.manifest import flowserve_version
from service.errors import BadRequest
from service.frontend.api.deps import core, state
from service.frontend.api.inputs import check_values, parse_json, read_body
from service.frontend.api.routing import CodecRoute
from service.frontend.api.schemas import INFERENCE_ERRORS, METADATA_ERRORS, Strict, json_body, parse

router = APIRouter(prefix="/v2", tags=["v2"], route_class=CodecRoute)

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16), "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64), "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
}
Datatype = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"]
HEADER = "inference-header-content-length"
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = ("log_prob", "bits_per_dim")
MAX_RANK = 8


# --- request bodies -------------------------------------------------------------------------

class TensorParameters(BaseModel):
    """Per-tensor parameters; other keys are allowed and ignored, as the protocol says."""

    model_config = ConfigDict(extra="allow")
    binary_data_size: int | None = Field(None, ge=0, description="bytes of this tensor in the binary part of the body")
    binary_data: bool | None = Field(None, description="outputs: return this tensor in the binary part")


class InferInputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[int] = Field(..., max_length=MAX_RANK, description="non-negative dimensions")
    datatype: Datatype
    parameters: TensorParameters | None = None
    data: list[Any] | None = Field(None, description="values, flat in row-major order or nested; absent with binary_data_size")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: TensorParameters | None = None


class InferParameters(BaseModel):
    model_config = ConfigDict(extra="allow")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the dequantization noise (models.seeding)")
    binary_data_output: bool = Field(False, description="return every output in the binary part")


class InferRequest(Strict):
    id: str | None = None
    parameters: InferParameters | None = None
    inputs: list[InferInputTensor] = Field(..., min_length=1, max_length=1, description="exactly one tensor, 'input'")
    outputs: list[RequestedOutput] | None = None


class BinaryHeader(BaseModel):
    length: int = Field(..., ge=0, description=f"the {HEADER} header: bytes of JSON before the binary tensors")


# --- response bodies ------------------------------------------------------------------------

class InferOutputTensor(BaseModel):
    name: str
    datatype: Literal["FP64"]
    shape: list[int]
    parameters: dict[str, int] | None = None
    data: list[float] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor] | None = None
    outputs: list[MetadataTensor] | None = None
    error: str | None = Field(None, description="why the model is not ready")


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool
    error: str | None = None


class ModelReady(BaseModel):
    name: str
    ready: bool
    error: str | None = None


def _not_ready(model: type[BaseModel]) -> dict:
    return {503: {"model": model, "description": "not ready"}}


# --- routes ---------------------------------------------------------------------------------

@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="flowserve", version=flowserve_version(), extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live)
async def live() -> Live:
    return Live(live=True)


@router.get("/health/ready", response_model=Ready, responses=_not_ready(Ready))
async def ready(request: Request) -> JSONResponse:
    s = state(request)
    error = "server is shutting down" if s.draining else s.core.not_ready_reason()
    ok = error is None
    body = Ready(ready=ok, error=error)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)


@router.get("/models/{name}", response_model=ModelMetadata, response_model_exclude_none=True, responses=METADATA_ERRORS)
@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, response_model_exclude_none=True, responses=METADATA_ERRORS)
async def model_metadata(request: Request, name: str, version: str | None = None) -> ModelMetadata:
    entry = core(request).entry(name, version)
    meta = ModelMetadata(name=name, versions=[entry.version],
                         platform=f"flowserve_{entry.backend}" if entry.backend else "flowserve")
    if entry.manifest is not None:
        meta.inputs = [MetadataTensor(name="input", datatype="FP32", shape=[-1, *entry.manifest.data_spec.shape])]
        meta.outputs = [MetadataTensor(name=o, datatype="FP64", shape=[-1]) for o in OUTPUTS]
    if not entry.ready:
        meta.error = entry.reason or entry.state
    return meta


@router.get("/models/{name}/ready", response_model=ModelReady, responses={**METADATA_ERRORS, **_not_ready(ModelReady)})
@router.get("/models/{name}/versions/{version}/ready", response_model=ModelReady, responses={**METADATA_ERRORS, **_not_ready(ModelReady)})
async def model_ready(request: Request, name: str, version: str | None = None) -> JSONResponse:
    entry = core(request).entry(name, version)
    body = ModelReady(name=name, ready=entry.ready, error=None if entry.ready else entry.reason or entry.state)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if entry.ready else 503)


def decode_tensor(tensor: InferInputTensor, binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One input tensor → an array of its shape and datatype, from ``data`` or from ``binary[offset:]``."""
    name = tensor.name
    if any(d < 0 or d > 2**31 for d in tensor.shape):
        raise BadRequest(f"inputs.{name}.shape: dimensions must be in 0..2^31, got {tensor.shape}")
    dtype = DTYPES[tensor.datatype]
    count = math.prod(tensor.shape)
    size = tensor.parameters.binary_data_size if tensor.parameters else None
    if size is not None:
        if size != count * dtype.itemsize or offset + size > len(binary):
            raise BadRequest(f"inputs.{name}: binary_data_size {size} does not match shape {tensor.shape} of {tensor.datatype} or the body")
        arr = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=count, offset=offset).reshape(tensor.shape)
        return arr, offset + size
    if tensor.data is None:
        raise BadRequest(f"inputs.{name}: no 'data' and no binary_data_size")
    try:
        arr = np.asarray(tensor.data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"inputs.{name}.data: values do not fit datatype {tensor.datatype}") from None
    if arr.size != count:
        raise BadRequest(f"inputs.{name}.data: {arr.size} values for shape {tensor.shape}")
    return arr.reshape(tensor.shape), offset


def split_body(body: bytes, header: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a request body (binary tensor extension)."""
    if header is None:
        return body, b""
    length = parse(BinaryHeader, {"length": header}, HEADER).length
    if length > len(body):
        raise BadRequest(f"{HEADER}: {length} is longer than the body ({len(body)} bytes)")
    return body[:length], body[length:]


def encode_outputs(req: InferRequest, outputs: dict[str, np.ndarray]) -> tuple[list[InferOutputTensor], list[bytes]]:
    """Output tensors in the requested order; binary ones as raw little-endian FP64 blobs."""
    params = req.parameters or InferParameters()
    if req.outputs:
        wanted = [(o.name, bool(o.parameters.binary_data) if o.parameters and o.parameters.binary_data is not None
                   else params.binary_data_output) for o in req.outputs]
    else:
        wanted = [(k, params.binary_data_output) for k in outputs]
    tensors, blobs = [], []
    for oname, as_binary in wanted:
        if oname not in outputs:
            raise BadRequest(f"outputs: unknown output {oname!r}; available: {', '.join(outputs)}")
        t = outputs[oname].astype("<f8")
        o = InferOutputTensor(name=oname, datatype="FP64", shape=list(t.shape))
        if as_binary:
            raw = t.tobytes()
            o.parameters = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            o.data = t.tolist()
        tensors.append(o)
    return tensors, blobs


@router.post("/models/{name}/infer", response_model=InferResponse,
             responses={**INFERENCE_ERRORS, 200: {"content": {"application/octet-stream": {}},
                                                  "description": "JSON, or JSON + binary tensors (binary tensor extension)"}},
             openapi_extra=json_body(InferRequest, "application/octet-stream"))
@router.post("/models/{name}/versions/{version}/infer", response_model=InferResponse,
             responses=INFERENCE_ERRORS,
             openapi_extra=json_body(InferRequest))
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    c = core(request)
    entry = c.ready_entry(name, version)
    spec = entry.manifest.data_spec
    body = await read_body(request, c.settings.max_body_bytes)
    head, binary = split_body(body, request.headers.get(HEADER))
    req = parse(InferRequest, parse_json(head))
    tensor = req.inputs[0]
    arr, end = decode_tensor(tensor, binary, 0)
    if end != len(binary):
        raise BadRequest(f"body: {len(binary) - end} bytes after the JSON header that no input's binary_data_size accounts for")
    x = check_values(arr.astype(np.float64), spec, f"inputs.{tensor.name}")
    s = await c.score(entry, x, (req.parameters or InferParameters()).seed, 1, f"inputs.{tensor.name}", request.is_disconnected)
    tensors, blobs = encode_outputs(req, {"log_prob": s.log_prob, "bits_per_dim": s.bits_per_dim})
    resp = InferResponse(model_name=name, model_version=entry.version, id=req.id, outputs=tensors)
    head_bytes = orjson.dumps(resp.model_dump(exclude_none=True))
    if not blobs:
        return Response(head_bytes, media_type="application/json")
    return Response(head_bytes + b"".join(blobs), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(head_bytes))})
