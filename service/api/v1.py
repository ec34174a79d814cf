"""v1 REST API: list/describe models, score (log-likelihood), sample."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import ORJSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.imageio import png_bytes

from .. import tasks
from ..errors import BadRequest
from .deps import require_key, state
from .inputs import decode_upload, impute_records, instances_to_array, media_type, parse_json, read_body

router = APIRouter(prefix="/v1", tags=["v1"])


class ScoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instances: list = Field(..., min_length=1, description="data-space instances, or records {feature: value}")
    seed: int = Field(0, ge=0, description="seed of the dequantization noise")
    iw_samples: int = Field(1, ge=1, description="importance-weighted bound with S samples (discrete data)")


class UploadOptions(BaseModel):
    """Query parameters of a PNG/JPEG/NPY upload to ``score``."""

    model_config = ConfigDict(extra="forbid")
    seed: int = Field(0, ge=0)
    iw_samples: int = Field(1, ge=1)


class SampleOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0, le=10)
    seed: int = Field(0, ge=0)


def validate(model: type[BaseModel], data: object) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        raise BadRequest(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}") from None


@router.get("/models")
async def list_models(request: Request) -> dict:
    repo = state(request).repository
    return {"models": [e.describe() for e in repo.models.values()]}


@router.get("/models/{name}")
async def describe_model(name: str, request: Request) -> dict:
    return state(request).repository.get(name).describe()


async def score_rows(request: Request, name: str, x: np.ndarray, seed: int, iw_samples: int) -> tuple[np.ndarray, object]:
    """Log-probabilities (nats, float64 ``(N,)``) of validated rows through the model's batcher."""
    s = state(request)
    entry = s.repository.get(name)
    batcher = entry.batcher("score")
    manifest = entry.manifest
    spec = manifest.data_spec
    if len(x) > s.settings.max_rows:
        raise BadRequest(f"instances: {len(x)} rows exceed the limit of {s.settings.max_rows}")
    if iw_samples > 1:
        if not spec.dequantized:
            raise BadRequest("iw_samples: importance weighting applies to discrete (dequantized) data only")
        if iw_samples > s.settings.max_iw_samples or len(x) * iw_samples > s.settings.max_rows * 8:
            raise BadRequest(f"iw_samples: {iw_samples} × {len(x)} rows is over the limit (max {s.settings.max_iw_samples} samples)")
        x = np.repeat(x, iw_samples, axis=0)
    payload = {"x": x}
    noise = tasks.dequantization_noise(manifest, len(x), seed)
    if noise is not None:
        payload["noise"] = noise
    lp = await batcher.submit(payload, s.settings.request_timeout_s)
    if iw_samples > 1:
        lp = lp.reshape(-1, iw_samples)
        m = lp.max(1, keepdims=True)
        lp = (m + np.log(np.exp(lp - m).mean(1, keepdims=True)))[:, 0]
    return lp, entry


@router.post("/models/{name}/score", dependencies=[Depends(require_key)])
async def score(name: str, request: Request) -> dict:
    """Log-likelihood per instance: JSON ``{"instances": [...]}``, or a PNG/JPEG/NPY body."""
    s = state(request)
    entry = s.repository.get(name)
    entry.batcher("score")
    spec = entry.manifest.data_spec
    body = await read_body(request, s.settings.max_body_bytes)
    ctype = media_type(request)
    if ctype == "application/json":
        opts = validate(ScoreOptions, parse_json(body))
        x = instances_to_array(opts.instances, spec)
        seed, iw = opts.seed, opts.iw_samples
    else:
        x = decode_upload(body, ctype, spec)
        opts = validate(UploadOptions, dict(request.query_params))
        seed, iw = opts.seed, opts.iw_samples
    lp, entry = await score_rows(request, name, x, seed, iw)
    d = spec.dims * math.log(2)
    return {
        "model": name,
        "version": entry.version,
        "unit": "nats",
        "bound": ("iw" if iw > 1 else "variational") if spec.dequantized else "exact",
        "iw_samples": iw,
        "results": [{"log_prob": float(v), "bits_per_dim": float(-v / d)} for v in lp],
    }


@router.post("/models/{name}/sample", dependencies=[Depends(require_key)])
async def sample(name: str, request: Request) -> Response:
    """``n`` samples at ``temperature`` from ``seed``: JSON, or a PNG grid with ``Accept: image/png``."""
    s = state(request)
    entry = s.repository.get(name)
    batcher = entry.batcher("sample")
    body = await read_body(request, s.settings.max_body_bytes)
    opts = validate(SampleOptions, parse_json(body) if body else {})
    if opts.n > s.settings.max_samples:
        raise BadRequest(f"n: {opts.n} samples exceed the limit of {s.settings.max_samples}")
    spec = entry.manifest.data_spec
    z = tasks.latent(entry.manifest, opts.n, opts.temperature, opts.seed)
    x = await batcher.submit({"z": z}, s.settings.request_timeout_s)
    if "image/png" in request.headers.get("accept", ""):
        if spec.kind != "image":
            raise BadRequest("Accept: image/png needs an image model")
        return Response(png_bytes(x, spec.levels or 256), media_type="image/png")
    samples = x.astype(np.int64).tolist() if spec.discrete else x.tolist()
    out: dict = {"model": name, "version": entry.version, "n": opts.n, "temperature": opts.temperature, "seed": opts.seed, "samples": samples}
    if spec.kind == "record" and spec.feature_names:
        out["records"] = [dict(zip(spec.feature_names, row)) for row in x.tolist()]
    return ORJSONResponse(out)


@router.post("/repository/reload", dependencies=[Depends(require_key)])
async def reload(request: Request) -> dict:
    """Load new or changed model versions, warm them, swap atomically, drain the old ones."""
    return {"changes": await state(request).repository.reload()}


class AnomalyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    records: list = Field(..., min_length=1, description="records {feature: value} (null or absent: imputed), arrays in feature order, or waveform windows (C, T)")
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate at which is_anomaly is decided")
    statistic: Literal["nll", "typicality", "conditional"] | None = Field(
        None, description="nll: one-sided; typicality: |nll − mean| (two-sided); conditional (records): nll minus its "
        "expected value given the record's point masses; default: the model's (set at training)")
    explain: Literal["anomalies", "all", "none"] = Field("anomalies", description="which records get an attribution")
    segments: int = Field(16, ge=2, le=128, description="time segments per waveform window for the attribution")
    top: int = Field(5, ge=1, le=128, description="attribution entries returned per record")


def _attributions(spec, calibration: dict, x: np.ndarray, opts: AnomalyOptions):  # noqa: ANN001, ANN202
    """Variant rows to score and a function turning (nll, variant nll) into per-record attribution lists."""
    from models import attribution as attr

    if spec.kind == "record":
        ref = np.asarray(calibration["reference"], dtype=np.float64)
        d, m = ref.shape
        names = spec.feature_names

        def explain(nll: np.ndarray, v: np.ndarray) -> list[list[dict]]:
            a = attr.feature_attribution(nll, v, d, m)
            return [[{"feature": names[k], "nats": float(row[k])} for k in np.argsort(-row, kind="stable")[: opts.top]] for row in a]

        return attr.feature_variants(x, ref), d * m, explain
    bounds = attr.segment_bounds(spec.shape[-1], opts.segments)

    def explain(nll: np.ndarray, v: np.ndarray) -> list[list[dict]]:
        a = attr.segment_attribution(nll, v, opts.segments)
        return [[{"segment": int(j), "start": int(bounds[j][0]), "end": int(bounds[j][1]), "nats": float(row[j])}
                 for j in np.argsort(-row, kind="stable")[: opts.top]] for row in a]

    return attr.segment_variants(x, opts.segments), opts.segments, explain


@router.post("/models/{name}/anomaly", dependencies=[Depends(require_key)])
async def anomaly(name: str, request: Request) -> dict:
    """Calibrated anomaly scores for records or waveform windows: NLL, per-dim NLL, percentile,
    conformal p-value, decision at the target false-positive rate, attribution, imputed fields."""
    from models.anomaly import BIN_MIDPOINT, AnomalyScorer

    s = state(request)
    entry = s.repository.get(name)
    batcher = entry.batcher("score")
    manifest = entry.manifest
    spec = manifest.data_spec
    if spec.kind not in ("record", "waveform") or not manifest.calibration:
        raise BadRequest(f"model {name!r} has no anomaly calibration (only record and waveform models trained by flowserve have one)")
    body = await read_body(request, s.settings.max_body_bytes)
    opts = validate(AnomalyOptions, parse_json(body))
    scorer = entry.extras.setdefault("anomaly_scorer", AnomalyScorer(manifest.calibration))
    try:
        statistic = scorer.resolve(opts.statistic)
    except ValueError as e:
        raise BadRequest(f"statistic: {e}") from None
    records, imputed = opts.records, [[] for _ in opts.records]
    if spec.kind == "record" and isinstance(records[0], dict) and "fill" in manifest.calibration:
        records, imputed = impute_records(records, spec, manifest.calibration["fill"], "records")
    x = instances_to_array(records, spec, "records")
    if len(x) > s.settings.max_rows:
        raise BadRequest(f"records: {len(x)} rows exceed the limit of {s.settings.max_rows}")
    # Scored at the dequantization bins' midpoints, as the calibration was (models.anomaly).
    noise = np.full(x.shape, BIN_MIDPOINT, dtype=np.float32) if spec.dequantized else None
    payload = {"x": x} if noise is None else {"x": x, "noise": noise}
    lp = await batcher.submit(payload, s.settings.request_timeout_s)
    results = scorer.assess(-lp, spec.dims, opts.target_fpr, statistic, x)
    chosen = [i for i, r in enumerate(results) if opts.explain == "all" or (opts.explain == "anomalies" and r["is_anomaly"])]
    if chosen and (spec.kind == "waveform" or "reference" in manifest.calibration):
        variants, per, explain = _attributions(spec, manifest.calibration, x[chosen], opts)
        if len(variants) > s.settings.max_queue_rows:
            raise BadRequest(f"explain: {len(chosen)} records need {len(variants)} extra rows (limit {s.settings.max_queue_rows}); "
                             "send fewer records or set explain to 'anomalies' or 'none'")
        vp = {"x": variants}
        if noise is not None:
            vp["noise"] = np.repeat(noise[chosen], per, axis=0)
        vlp = await batcher.submit(vp, s.settings.request_timeout_s)
        for i, a in zip(chosen, explain(scorer.statistic(-lp[chosen], statistic, x[chosen]), scorer.statistic(-vlp, statistic, variants))):
            results[i]["attribution"] = a
    for r, names in zip(results, imputed):
        if spec.kind == "record":
            r["imputed"] = names
    return {
        "model": name,
        "version": entry.version,
        "target_fpr": opts.target_fpr,
        "statistic": statistic,
        "calibration": {"method": manifest.calibration["method"], "n": manifest.calibration["n"]},
        "results": results,
    }
