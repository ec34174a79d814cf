"""v1 REST API, a thin codec over :mod:`service.core`: list/describe models, score, sample, anomaly, drift, reload.

Request bodies are parsed by the pydantic models below, which ``/openapi.json`` documents
(uploads of PNG/JPEG/NPY bodies to ``score`` are documented as alternatives of the JSON body).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from models.imageio import png_bytes
from models.plots import MAX_PANELS, waveform_png
from service.core.drift import STREAM_PATTERN
from service.core.inference import Bound
from service.errors import BadRequest
from service.frontend.api.deps import core
from service.frontend.api.inputs import anomaly_records, decode_upload, instances_to_array, media_type, parse_json, read_body
from service.frontend.api.routing import CodecRoute
from service.frontend.api.schemas import INFERENCE_ERRORS, METADATA_ERRORS, Strict, error_responses, json_body, parse

router = APIRouter(prefix="/v1", tags=["v1"], route_class=CodecRoute)


# --- request bodies -------------------------------------------------------------------------

class ScoreRequest(Strict):
    instances: list[Any] = Field(..., min_length=1, description="data-space instances (nested arrays of shape (N, *shape) "
                                 "or one instance), or records {feature: value}")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the dequantization noise (models.seeding)")
    iw_samples: int = Field(1, ge=1, le=2**31, description="importance-weighted bound with S samples (discrete data)")


class UploadOptions(Strict):
    """Query parameters of a PNG/JPEG/NPY upload to ``score``."""

    seed: int = Field(0, ge=0, le=2**63 - 1)
    iw_samples: int = Field(1, ge=1, le=2**31)


class SampleRequest(Strict):
    n: int = Field(1, ge=1, le=2**31, description="number of samples")
    temperature: float = Field(1.0, ge=0, le=10, description="latent scale T: z ~ N(0, T² I)")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of the latent draw (models.seeding)")


class AnomalyRequest(Strict):
    records: list[Any] = Field(..., min_length=1, description="records {feature: value} (null or absent: not measured), "
                               "arrays in feature order, or waveform windows (C, T)")
    target_fpr: float = Field(0.01, gt=0, lt=1, description="false-positive rate at which is_anomaly is decided")
    statistic: Literal["nll", "typicality", "conditional"] | None = Field(
        None, description="nll: one-sided; typicality: |nll − mean| (two-sided); conditional (records): nll minus its "
        "expected value given the record's point masses; default: the model's (set at training)")
    explain: Literal["anomalies", "all", "none"] = Field("anomalies", description="which records get an attribution")
    segments: int = Field(16, ge=2, le=128, description="time segments per waveform window for the attribution")
    top: int = Field(5, ge=1, le=128, description="attribution entries returned per record")
    missing: Literal["marginal", "median"] = Field(
        "marginal", description="records with absent features: 'marginal' scores the marginal likelihood of the observed "
        "features (importance sampling over the absent ones) against calibration records masked to the same pattern; "
        "'median' fills absent features with calibration medians and uses the complete records' calibration")
    stream: str | None = Field(None, pattern=STREAM_PATTERN, description="the stream whose drift detector these records feed, "
                               "in order (a ward, a device, a feed; 1-64 characters of letters, digits, _ . : -); default: "
                               "'default'")


class DriftQuery(Strict):
    """Query parameters of the drift routes."""

    stream: str | None = Field(None, pattern=STREAM_PATTERN, description="one stream; default: every stream")


# --- response bodies ------------------------------------------------------------------------

class ModelInfo(BaseModel):
    name: str
    version: str
    state: Literal["loading", "ready", "failed"]
    reason: str | None = Field(None, description="why the model failed to load")
    architecture: str | None = None
    data_spec: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = Field(None, description="anomaly calibration summary (record and waveform models)")
    tasks: list[str] | None = None
    devices: list[str] | None = None
    backend: str | None = None
    execution: dict[str, str] | None = Field(None, description="per task: how it runs (CUDA graphs and their batch sizes, IO "
                                             "binding, tiles for batch-invariant results, or eager)")
    load_seconds: float | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class ScoreResult(BaseModel):
    log_prob: float = Field(..., description="log-likelihood, nats per instance (a lower bound for discrete data)")
    bits_per_dim: float = Field(..., description="−log_prob / (D ln 2)")


class ScoreResponse(BaseModel):
    model: str
    version: str
    unit: Literal["nats"] = "nats"
    bound: Bound = Field(..., description="exact (continuous data), variational or iw (importance-weighted) bound")
    iw_samples: int
    results: list[ScoreResult]


class SampleResponse(BaseModel):
    model: str
    version: str
    n: int
    temperature: float
    seed: int
    samples: list[Any] = Field(..., description="(n, *shape) in data space; integers for discrete data")
    records: list[dict[str, float]] | None = Field(None, description="record models: each sample as {feature: value}")


class FeatureAttribution(BaseModel):
    feature: str
    nats: float = Field(..., description="how much of the statistic disappears when this feature alone is made typical")


class GroupAttribution(BaseModel):
    group: str = Field(..., description="a group of coupled features declared in the schema (e.g. blood pressure)")
    features: list[str] = Field(..., description="its observed members, replaced together")
    nats: float = Field(..., description="how much of the statistic disappears when the whole group is made typical")


class SegmentAttribution(BaseModel):
    segment: int
    start: int = Field(..., description="first sample of the segment")
    end: int = Field(..., description="one past its last sample")
    nats: float


class AnomalyResult(BaseModel):
    nll: float = Field(..., description="negative log-likelihood, nats per record")
    nll_per_dim: float
    percentile: float = Field(..., description="of the NLL among the calibration records, 0..100")
    statistic: str
    p_value: float = Field(..., description="conformal p-value (1 + #{c ≥ s})/(n + 1)")
    is_anomaly: bool
    threshold: float | None = Field(None, description="statistic above which records are flagged; absent when the calibration "
                                    "set is too small for target_fpr (then nothing is flagged)")
    attribution: list[FeatureAttribution | GroupAttribution] | list[SegmentAttribution] | None = Field(
        None, description="present for the records the request's `explain` picks; records: observed features and groups only")
    absent: list[str] | None = Field(None, description="record models: features absent or null in the request (the record's "
                                     "missingness pattern is every other feature)")
    imputed: list[str] | None = Field(None, description="record models with missing='median': the absent features, filled "
                                      "with calibration medians")
    calibration_n: int | None = Field(None, description="record models: calibration records the p-value compares with "
                                      "(those of the same pattern for missing='marginal')")
    p_value_resolution: float | None = Field(None, description="smallest possible p-value, 1/(calibration_n + 1)")


class CalibrationUsed(BaseModel):
    method: str
    n: int = Field(..., description="calibration records of complete records")
    p_value_resolution: float = Field(..., description="1/(n + 1)")
    missing: Literal["marginal", "median"] | None = Field(None, description="record models: how absent features were scored")
    samples: int | None = Field(None, description="importance samples K per record with absent features (missing='marginal')")


class DriftReading(BaseModel):
    stream: str
    records: int = Field(..., description="records the stream's detector has seen since its last reset")
    statistic: float = Field(..., description="log R, the mixture Shiryaev-Roberts statistic after the stream's latest record "
                             "(nats; models.anomaly.drift)")
    threshold: float = Field(..., description="log A = log ERT (nats): the alarm is raised when the statistic reaches it")
    alarm: bool = Field(..., description="raised at some record since the last reset (it stays raised until a reset)")
    alarm_at: int | None = Field(None, description="the stream's record (1-based, since the last reset) that raised the alarm")
    direction: Literal["unusual", "typical"] | None = Field(None, description="which side carries the statistic: unusual "
                                                          "(NLL up) or typical (NLL down, e.g. a stuck sensor)")
    peak: float = Field(..., description="the largest statistic since the last reset (nats)")


class AnomalyResponse(BaseModel):
    model: str
    version: str
    target_fpr: float
    statistic: str
    calibration: CalibrationUsed
    results: list[AnomalyResult]
    drift: DriftReading | None = Field(None, description="the stream's drift detector after these records (absent when "
                                       "drift tracking is off)")


class DriftStatus(BaseModel):
    model: str
    version: str
    ert: float = Field(..., description="expected records between false alarms without drift (FLOWSERVE_DRIFT_ERT)")
    confidence: float = Field(..., description="probability over calibration sets that the ERT holds (FLOWSERVE_DRIFT_CONFIDENCE)")
    streams: list[DriftReading]


class DriftReset(BaseModel):
    model: str
    version: str
    reset: list[str] = Field(..., description="the streams forgotten (they start afresh with their next record)")


class ReloadResponse(BaseModel):
    changes: dict[str, str] = Field(..., description="per model: what the reload did")


# --- routes ---------------------------------------------------------------------------------

def _wants_png(request: Request, spec: Any, name: str) -> bool:
    """``Accept: image/png``: image and waveform models answer with a picture; others get a 400."""
    wants = "image/png" in request.headers.get("accept", "")
    if wants and spec.kind not in ("image", "waveform"):
        raise BadRequest(f"Accept: image/png needs an image or waveform model; {name!r} is a {spec.kind} model")
    return wants


@router.get("/models", response_model=ModelList, response_model_exclude_none=True)
async def list_models(request: Request) -> ModelList:
    return ModelList(models=[ModelInfo(**e.describe()) for e in core(request).models()])


@router.get("/models/{name}", response_model=ModelInfo, response_model_exclude_none=True, responses=METADATA_ERRORS)
async def describe_model(name: str, request: Request) -> ModelInfo:
    return ModelInfo(**core(request).entry(name).describe())


@router.post("/models/{name}/score", response_model=ScoreResponse, responses=INFERENCE_ERRORS,
             openapi_extra=json_body(ScoreRequest, "image/png", "image/jpeg", "application/x-npy"))
async def score(name: str, request: Request) -> ScoreResponse:
    """Log-likelihood per instance: JSON ``{"instances": [...]}``, or a PNG/JPEG/NPY body
    (with ``seed`` and ``iw_samples`` as query parameters)."""
    c = core(request)
    entry = c.ready_entry(name)
    spec = entry.manifest.data_spec
    body = await read_body(request, c.settings.max_body_bytes)
    ctype = media_type(request)
    if ctype == "application/json":
        opts = parse(ScoreRequest, parse_json(body))
        x = instances_to_array(opts.instances, spec)
    else:
        opts = parse(UploadOptions, dict(request.query_params), "query")
        x = decode_upload(body, ctype, spec)
    s = await c.score(entry, x, opts.seed, opts.iw_samples, gone=request.is_disconnected)
    return ScoreResponse(model=name, version=entry.version, bound=s.bound, iw_samples=s.iw_samples,
                         results=[ScoreResult(log_prob=lp, bits_per_dim=b) for lp, b in zip(s.log_prob.tolist(), s.bits_per_dim.tolist())])


@router.post("/models/{name}/sample", response_model=SampleResponse, response_model_exclude_none=True,
             responses={**INFERENCE_ERRORS, 200: {"content": {"image/png": {}}, "description": "samples (JSON), or with "
                                                  "Accept: image/png a PNG: a grid (image models) or traces (waveform models)"}},
             openapi_extra=json_body(SampleRequest, required=False))
async def sample(name: str, request: Request) -> Response | SampleResponse:
    """``n`` samples at ``temperature`` from ``seed``: JSON, or a PNG grid with ``Accept: image/png``."""
    c = core(request)
    entry = c.ready_entry(name)
    spec = entry.manifest.data_spec
    body = await read_body(request, c.settings.max_body_bytes)
    opts = parse(SampleRequest, parse_json(body) if body.strip() else {})
    wants_png = _wants_png(request, spec, name)
    if wants_png and spec.kind == "waveform" and opts.n > MAX_PANELS:
        raise BadRequest(f"n: a plot shows at most {MAX_PANELS} windows; ask for fewer or for JSON")
    x = await c.sample(entry, opts.n, opts.temperature, opts.seed, request.is_disconnected)
    if wants_png and spec.kind == "waveform":
        titles = [f"sample {i} (seed {opts.seed}, T = {opts.temperature:g})" for i in range(len(x))]
        return Response(waveform_png(x, spec.feature_names or [], spec.units, titles), media_type="image/png")
    if wants_png:
        return Response(png_bytes(x, spec.levels or 256), media_type="image/png")
    samples = x.astype(np.int64).tolist() if spec.discrete else x.tolist()
    records = [dict(zip(spec.feature_names, row)) for row in x.tolist()] if spec.kind == "record" and spec.feature_names else None
    return SampleResponse(model=name, version=entry.version, n=opts.n, temperature=opts.temperature, seed=opts.seed,
                          samples=samples, records=records)


@router.post("/repository/reload", response_model=ReloadResponse,
             responses=error_responses(401, 500, 503))
async def reload(request: Request) -> ReloadResponse:
    """Load new or changed model versions, warm them, swap atomically, drain the old ones."""
    return ReloadResponse(changes=await core(request).reload())


@router.post("/models/{name}/anomaly", response_model=AnomalyResponse, response_model_exclude_none=True,
             responses={**INFERENCE_ERRORS, 200: {"content": {"image/png": {}}, "description": "anomaly scores (JSON), or "
                                                  "with Accept: image/png (waveform models) a plot of the windows with their "
                                                  "attributed segments shaded"}},
             openapi_extra=json_body(AnomalyRequest))
async def anomaly(name: str, request: Request) -> Response | AnomalyResponse:
    """Calibrated anomaly scores for records or waveform windows: NLL, per-dim NLL, percentile,
    conformal p-value, decision at the target false-positive rate, attribution, the absent
    features and the calibration the p-value used; for waveform models a PNG plot with ``Accept: image/png``."""
    c = core(request)
    entry = c.anomaly_entry(name)
    spec = entry.manifest.data_spec
    wants_png = _wants_png(request, spec, name)
    body = await read_body(request, c.settings.max_body_bytes)
    opts = parse(AnomalyRequest, parse_json(body))
    if wants_png and len(opts.records) > MAX_PANELS:
        raise BadRequest(f"records: a plot shows at most {MAX_PANELS} windows; send fewer or ask for JSON")
    x, observed = anomaly_records(opts.records, spec)
    report = await c.anomaly(entry, x, opts.target_fpr, opts.statistic, opts.explain, opts.segments, opts.top,
                             gone=request.is_disconnected, observed=observed, missing=opts.missing, stream=opts.stream)
    if wants_png:
        titles = [f"window {i}: p = {r.p_value:.3g}, {report.statistic} {'ANOMALY' if r.is_anomaly else 'normal'} "
                  f"at {opts.target_fpr:g}" for i, r in enumerate(report.results)]
        shaded = [r.attribution or [] for r in report.results]
        return Response(waveform_png(x, spec.feature_names or [], spec.units, titles, shaded), media_type="image/png")
    record = spec.kind == "record"
    results = [AnomalyResult(nll=r.nll, nll_per_dim=r.nll_per_dim, percentile=r.percentile, statistic=r.statistic,
                             p_value=r.p_value, is_anomaly=r.is_anomaly, threshold=r.threshold, attribution=r.attribution,
                             absent=r.absent, imputed=r.imputed, calibration_n=r.calibration_n if record else None,
                             p_value_resolution=r.p_value_resolution if record else None)
               for r in report.results]
    cal = report.calibration
    return AnomalyResponse(model=name, version=entry.version, target_fpr=opts.target_fpr, statistic=report.statistic,
                           calibration=CalibrationUsed(method=cal.method, n=cal.n, p_value_resolution=cal.p_value_resolution,
                                                       missing=cal.missing, samples=cal.samples),
                           results=results, drift=None if report.drift is None else DriftReading(**report.drift))


@router.get("/models/{name}/drift", response_model=DriftStatus, response_model_exclude_none=True,
            responses=error_responses(400, 404, 500, 503))
async def drift(name: str, request: Request) -> DriftStatus:
    """The drift detectors of the model version's streams (``?stream=`` for one): statistic, threshold, alarm."""
    c = core(request)
    opts = parse(DriftQuery, dict(request.query_params), "query")
    entry = c.drift_entry(name)
    readings = await c.drift(entry, "readings", opts.stream)
    s = c.settings
    return DriftStatus(model=name, version=entry.version, ert=s.drift_ert, confidence=s.drift_confidence,
                       streams=[DriftReading(**r) for r in readings])


@router.post("/models/{name}/drift/reset", response_model=DriftReset, responses=error_responses(400, 401, 404, 500, 503))
async def drift_reset(name: str, request: Request) -> DriftReset:
    """Forget a stream's drift state (``?stream=``) or every stream's: after an alarm has been dealt with."""
    c = core(request)
    opts = parse(DriftQuery, dict(request.query_params), "query")
    entry = c.drift_entry(name)
    gone = await c.drift(entry, "reset", opts.stream)
    return DriftReset(model=name, version=entry.version, reset=[g["stream"] for g in gone])
