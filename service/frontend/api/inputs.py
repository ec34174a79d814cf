"""Turn request bodies into validated numpy batches for a model's ``DataSpec``.

Every check names the field that failed: shape, dtype, NaN/inf, range, missing features.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request

from models.errors import DataError
from models.spec import DataSpec
from service.errors import BadRequest, ClientClosed, PayloadTooLarge, UnsupportedMediaType

NPY_TYPES = {"application/x-npy", "application/octet-stream", "application/npy"}
IMAGE_TYPES = {"image/png", "image/jpeg"}
FLOAT32_MAX = float(np.finfo(np.float32).max)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes (413) whether or not Content-Length is sent."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed("the client disconnected before its body arrived") from None
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    if not body:
        raise BadRequest("request body is empty; send JSON")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"malformed JSON: {e}") from None


def media_type(request: Request) -> str:
    """The body's media type; absent or curl's default form type count as JSON."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    return "application/json" if ctype in ("", "application/x-www-form-urlencoded") else ctype


def check_values(x: np.ndarray, spec: DataSpec, field: str) -> np.ndarray:
    """Validate a ``(N, *shape)`` float array against ``spec``: finite, integer levels in range for images."""
    if x.ndim == len(spec.shape) and x.shape == spec.shape:
        x = x[None]
    if spec.kind == "image" and len(spec.shape) == 3 and spec.shape[0] == 1 and x.shape[1:] == spec.shape[1:]:
        x = x[:, None]  # (N, H, W) for one-channel images
    if x.shape[1:] != tuple(spec.shape):
        raise BadRequest(f"{field}: expected shape (N, {', '.join(map(str, spec.shape))}), got {tuple(x.shape)}")
    if len(x) == 0:
        raise BadRequest(f"{field}: no instances")
    # One vectorised test for the common case (NaN fails every comparison); the detailed checks name the culprit.
    if spec.discrete:
        ok = bool(((x >= 0) & (x <= spec.levels - 1) & (x == np.rint(x))).all())
    else:
        ok = bool(np.abs(x).max() <= FLOAT32_MAX)
    if not ok:
        _refuse(x, spec, field)
    if spec.discrete_features:
        _check_levels(x.reshape(len(x), -1), spec, field)
    return x.astype(np.float32)


def _check_levels(x: np.ndarray, spec: DataSpec, field: str) -> None:
    """Integer-valued features of records ``(N, D)`` (``spec.discrete_features``: the Glasgow coma scale) must be integers:
    the flow scores each level's unit bin, and a value between levels has no bin."""
    cols = np.asarray(spec.discrete_features)
    bad = x[:, cols] != np.rint(x[:, cols])
    if bad.any():
        i, k = (int(v) for v in np.argwhere(bad)[0])
        name = (spec.feature_names or [str(j) for j in range(x.shape[1])])[cols[k]]
        raise BadRequest(f"{field}[{i}].{name}: value {x[i, cols[k]]:g} is not an integer; this feature takes integer levels")


def _refuse(x: np.ndarray, spec: DataSpec, field: str) -> None:
    """Raise the :class:`BadRequest` that names the first offending value of ``x``."""
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise BadRequest(f"{field}[{i}]: NaN or infinite value")
    big = np.abs(x) > FLOAT32_MAX
    if big.any():
        idx = tuple(int(v) for v in np.argwhere(big)[0])
        raise BadRequest(f"{field}[{idx[0]}]: value {x[idx]:g} at {list(idx[1:])} is beyond float32 (|x| ≤ {FLOAT32_MAX:.4g})")
    hi = spec.levels - 1
    idx = tuple(int(v) for v in np.argwhere((x < 0) | (x > hi) | (x != np.round(x)))[0])
    raise BadRequest(f"{field}[{idx[0]}]: value {x[idx]:g} at {list(idx[1:])} is not an integer level in 0..{hi}")


def records_to_array(records: list[Any], spec: DataSpec, field: str, absent_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``[{feature: value}]`` → values ``(N, D)`` in ``spec.feature_names`` order and the mask ``(N, D)`` of the
    features each record has. Unknown features are errors; so are absent (or null) ones unless ``absent_ok``,
    when they hold 0 until the inference core fills them (:func:`service.core.inference.impute`)."""
    names = spec.feature_names or []
    index = {n: i for i, n in enumerate(names)}
    out = np.zeros((len(records), len(names)), dtype=np.float64)
    observed = np.ones((len(records), len(names)), dtype=bool)
    for r, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise BadRequest(f"{field}[{r}]: expected an object {{feature: value}}")
        unknown = set(rec) - set(index)
        if unknown:
            raise BadRequest(f"{field}[{r}]: unknown feature(s) {sorted(unknown)}; expected {names}")
        if len(rec) < len(names) or None in rec.values():
            missing = [n for n in names if rec.get(n) is None]
            if not absent_ok:
                raise BadRequest(f"{field}[{r}]: missing feature(s) {missing}; scoring takes complete records (the anomaly "
                                 "route takes records with absent features and scores their marginal likelihood)")
            observed[r, [index[n] for n in missing]] = False
        for n, v in rec.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise BadRequest(f"{field}[{r}].{n}: expected a number, got {type(v).__name__}")
            out[r, index[n]] = v
    return out, observed


def instances_to_array(instances: Any, spec: DataSpec, field: str = "instances") -> np.ndarray:
    """JSON instances → validated ``(N, *shape)`` float32."""
    if not isinstance(instances, list) or not instances:
        raise BadRequest(f"{field}: expected a non-empty list")
    if spec.kind == "record" and isinstance(instances[0], dict):
        x = records_to_array(instances, spec, field)[0]
    else:
        try:
            x = np.asarray(instances, dtype=np.float64)
        except (ValueError, TypeError):
            raise BadRequest(f"{field}: expected a rectangular array of numbers with shape (N, {', '.join(map(str, spec.shape))})") from None
    return check_values(x, spec, field)


def anomaly_records(records: Any, spec: DataSpec, field: str = "records") -> tuple[np.ndarray, np.ndarray | None]:
    """Records or windows of the anomaly route → validated ``(N, *shape)`` float32, and for ``{feature: value}``
    records the mask ``(N, D)`` of the features sent (absent ones may be left out or null; the core fills them)."""
    if spec.kind != "record" or not isinstance(records, list) or not records or not isinstance(records[0], dict):
        return instances_to_array(records, spec, field), None
    x, observed = records_to_array(records, spec, field, absent_ok=True)
    return check_values(x, spec, field), observed


def decode_upload(body: bytes, content_type: str, spec: DataSpec) -> np.ndarray:
    """An uploaded PNG/JPEG (one image; 0..255 mapped onto the model's levels) or NPY batch."""
    if content_type in IMAGE_TYPES:
        if spec.kind != "image":
            raise UnsupportedMediaType(f"{content_type} uploads need an image model")
        from models.data.images import read_image

        try:
            img = read_image(body, "upload").astype(np.float64)
        except DataError as e:
            raise BadRequest(str(e)) from None
        if spec.levels and spec.levels != 256:
            img = np.round(img * (spec.levels - 1) / 255.0)
        return check_values(img[None], spec, "upload")
    if content_type in NPY_TYPES:
        try:
            arr = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise BadRequest(f"upload: not a valid .npy array ({e})") from None
        if arr.dtype.kind not in "biuf":
            raise BadRequest(f"upload: dtype {arr.dtype} is not numeric")
        return check_values(arr.astype(np.float64), spec, "upload")
    raise UnsupportedMediaType(f"unsupported Content-Type {content_type!r}; use application/json, image/png or application/x-npy")
