"""The inference core: scoring, the importance-weighted bound, sampling, anomaly scores with
attribution. Every protocol (v1, V2) decodes its request into numpy arrays, calls this module,
and encodes what it returns; nothing here knows about HTTP bodies.

Units: log-probabilities and NLLs are nats per sample (float64 ``(N,)``); bits/dim is
``−log p / (D ln 2)``.

Every call takes an optional ``gone`` probe (for HTTP, ``request.is_disconnected``): a request
whose client left stops waiting and its rows leave the queue.

Out of support: a row whose log-density is not finite (for example a record with a feature at
1e30, which the flow maps outside what float32 can represent) is refused with a 400
(:class:`OutOfSupport`) that names the row and, where the data spec has ranges, each feature
outside its range. No score is ever returned as ``null``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, KeysView
from dataclasses import dataclass
from typing import Literal

import numpy as np

from models import sampling
from models.anomaly import attribution as attr
from models.anomaly.marginal import Pattern, pattern_of
from models.anomaly.missing import NoPatternCalibration, PatternCalibrations
from models.anomaly.scoring import AnomalyScorer, Assessment, scoring_noise
from models.artifacts.manifest import Calibration
from models.logspace import log_mean_exp
from models.spec import DataSpec
from service.core import tasks
from service.core.drift import DEFAULT_STREAM, DriftMonitor, reading_dict
from service.core.entry import Gone, ModelEntry, Repository, row_chunks
from service.errors import BadRequest, NotFound
from service.metrics import Metrics
from service.settings import Settings

Bound = Literal["exact", "variational", "iw"]
Explain = Literal["anomalies", "all", "none"]
Missing = Literal["marginal", "median"]
log = logging.getLogger("flowserve.core")
DriftAction = Literal["update", "readings", "reset"]
BUILD_SLOTS = 2  # pattern calibrations built at once per model (each streams n × K rows through the batcher)


class OutOfSupport(BadRequest):
    """400: a valid input the model gives a non-finite log-density."""

    reason = "out_of_support"


@dataclass(frozen=True)
class Scores:
    """Log-probabilities of scored rows and how they were computed."""

    entry: ModelEntry
    log_prob: np.ndarray  # (N,) float64, nats
    bound: Bound
    iw_samples: int

    @property
    def bits_per_dim(self) -> np.ndarray:
        return -self.log_prob / (self.entry.manifest.data_spec.dims * math.log(2))


@dataclass(frozen=True)
class CalibrationUsed:
    """The calibration an anomaly request's p-values compare with."""

    method: str  # "conformal"
    n: int  # calibration records of complete records
    missing: Missing | None = None  # how absent features were handled (record models)
    samples: int | None = None  # importance samples per record of a marginal likelihood (missing="marginal")

    @property
    def p_value_resolution(self) -> float:
        """The smallest p-value of a complete record, ``1/(n + 1)``."""
        return 1.0 / (self.n + 1)


@dataclass(frozen=True)
class AnomalyReport:
    entry: ModelEntry
    statistic: str
    results: list[Assessment]  # one per record, in request order
    calibration: CalibrationUsed
    drift: dict | None = None  # the stream's drift reading after these records (service.core.drift.reading_dict)


def impute(spec: DataSpec, fill: list[float] | None, x: np.ndarray, observed: np.ndarray, field: str) -> np.ndarray:
    """Records ``x (N, D)`` with their absent features (``observed (N, D)`` False) set to ``fill`` (the calibration
    medians, per feature; rounded to a level for integer-valued features). A record needs at least one observed
    feature, and absent features need a ``fill`` (``None``: the model's calibration did not store one)."""
    observed = np.asarray(observed, dtype=bool)
    if observed.all():
        return x
    names = spec.feature_names or []
    empty = np.flatnonzero(~observed.any(1))
    if len(empty):
        raise BadRequest(f"{field}[{int(empty[0])}]: no features (all absent or null); send at least one of {names}")
    if fill is None:
        i = int(np.flatnonzero(~observed.all(1))[0])
        raise BadRequest(f"{field}[{i}]: missing feature(s) {[n for n, seen in zip(names, observed[i]) if not seen]}; "
                         "this model's calibration has no fill values for absent features: send complete records")
    fill = np.asarray(fill, dtype=np.float64)
    if spec.discrete_features:
        fill[spec.discrete_features] = np.rint(fill[spec.discrete_features])
    return np.where(observed, x, fill[None, :]).astype(x.dtype)


def _out_of_range(spec: DataSpec, row: np.ndarray) -> list[str]:
    """Features (records) or channels (waveforms) of one row outside the data spec's ranges."""
    if not spec.ranges:
        return []
    lo, hi = np.asarray(spec.ranges, dtype=np.float32).T  # as the rows were scored (FiO2 0.21 is float32(0.21) in both)
    per = np.asarray(row, dtype=np.float32).reshape(len(lo), -1)
    names = spec.feature_names or [str(k) for k in range(len(lo))]
    out = []
    for k in range(len(lo)):
        if per[k].min() < lo[k] or per[k].max() > hi[k]:
            value = f"{per[k, 0]:g}" if per.shape[1] == 1 else f"{per[k].min():g}..{per[k].max():g}"
            out.append(f"{names[k]} = {value} (range {lo[k]:g}..{hi[k]:g})")
    return out


def check_support(spec: DataSpec, x: np.ndarray, log_prob: np.ndarray, field: str, index: np.ndarray | None = None) -> None:
    """Raise :class:`OutOfSupport` for the first row of ``x`` whose ``log_prob`` is not finite
    (named by its position in the request: ``index[i]`` when ``x`` is part of it)."""
    bad = np.flatnonzero(~np.isfinite(log_prob))
    if not len(bad):
        return
    i = int(bad[0])
    where = _out_of_range(spec, x[i])
    detail = f"; outside the schema's ranges: {', '.join(where)}" if where else ""
    more = f" ({len(bad)} rows in all)" if len(bad) > 1 else ""
    raise OutOfSupport(f"{field}[{i if index is None else int(index[i])}]: outside the model's support (its log-density is not finite){more}{detail}")


class InferenceCore:
    """What every protocol calls: one instance per service, over its model repository."""

    def __init__(self, settings: Settings, repository: Repository, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.metrics = metrics
        self.noise = tasks.NoiseCache()

    def models(self) -> list[ModelEntry]:
        """Every served model (any state), by name."""
        return [self.repository.models[k] for k in sorted(self.repository.models)]

    def model_names(self) -> KeysView[str]:
        """The served models' names (a view, for membership tests on the request path)."""
        return self.repository.models.keys()

    def not_ready_reason(self) -> str | None:
        """Why the server is not ready to serve (``None`` when it is): models still loading, every executor restarting."""
        return self.repository.not_ready_reason()

    async def reload(self) -> dict[str, str]:
        """Load new or changed model versions, warm them, swap atomically, drain the old ones; what changed, per model."""
        return await self.repository.reload()

    def entry(self, name: str, version: str | None = None) -> ModelEntry:
        """The served entry for ``name`` (any state); 404 when another ``version`` is asked for."""
        entry = self.repository.get(name)
        if version is not None and version != entry.version:
            raise NotFound(f"model {name!r} has no loaded version {version!r} (serving {entry.version})")
        return entry

    def ready_entry(self, name: str, version: str | None = None) -> ModelEntry:
        """As :meth:`entry`, and 503 unless the model is ready."""
        entry = self.entry(name, version)
        entry.check_ready()
        return entry

    def _check_rows(self, n: int, field: str) -> None:
        if n > self.settings.max_rows:
            raise BadRequest(f"{field}: {n} rows exceed the limit of {self.settings.max_rows}")

    async def score(self, entry: ModelEntry, x: np.ndarray, seed: int = 0, iw_samples: int = 1, field: str = "instances",
                    gone: Gone | None = None) -> Scores:
        """``log p(x)`` of validated rows ``x (N, *shape)`` through the model's batcher.

        Discrete data: the variational bound with noise from ``seed``, or with ``iw_samples`` S > 1
        the importance-weighted bound ``log (1/S) Σ_s p(x + u_s)/q(u_s|x)`` (float64 log-sum-exp).
        ``entry`` is the :meth:`ready_entry` the codec decoded ``x`` for.
        """
        spec = entry.manifest.data_spec
        self._check_rows(len(x), field)
        rows = x
        if iw_samples > 1:
            if not spec.dequantized:
                raise BadRequest("iw_samples: importance weighting applies to discrete (dequantized) data only")
            s = self.settings
            if iw_samples > s.max_iw_samples or len(x) * iw_samples > s.max_rows * 8:
                raise BadRequest(f"iw_samples: {iw_samples} × {len(x)} rows is over the limit (max {s.max_iw_samples} samples)")
            rows = np.repeat(x, iw_samples, axis=0)
        payload = {"x": rows}
        noise = self.noise.noise(entry.manifest, len(rows), seed)
        if noise is not None:
            payload["noise"] = noise
        lp = await entry.batcher("score").submit(payload, self.settings.request_timeout_s, gone)
        if iw_samples > 1:
            lp = log_mean_exp(lp.reshape(-1, iw_samples), axis=1)
        check_support(spec, x, lp, field)
        bound: Bound = ("iw" if iw_samples > 1 else "variational") if spec.dequantized else "exact"
        return Scores(entry, np.asarray(lp, dtype=np.float64), bound, iw_samples)

    async def sample(self, entry: ModelEntry, n: int, temperature: float, seed: int, gone: Gone | None = None) -> np.ndarray:
        """``n`` samples ``(n, *shape)`` in data space at ``temperature``, latents drawn from ``seed``, from a :meth:`ready_entry`."""
        if n > self.settings.max_samples:
            raise BadRequest(f"n: {n} samples exceed the limit of {self.settings.max_samples}")
        batcher = entry.batcher("sample")
        spec = entry.manifest.data_spec
        if sampling.needs_rejection(spec):  # valid records (models.sampling): derived features, ranges by rejection
            gen = sampling.rejection(spec, n, lambda k, r: tasks.latent(entry.manifest, k, temperature, sampling.round_seed(seed, r)))
            z = next(gen)
            try:
                while True:
                    z = gen.send(await batcher.submit({"z": z}, self.settings.request_timeout_s, gone))
            except StopIteration as done:
                return done.value
            except sampling.SamplingError as e:
                raise BadRequest(f"temperature: {e}") from None
        z = tasks.latent(entry.manifest, n, temperature, seed)
        x = await batcher.submit({"z": z}, self.settings.request_timeout_s, gone)
        if not np.isfinite(x).all():
            raise BadRequest(f"temperature: {temperature:g} takes this model's inverse outside what float32 represents; "
                             "use a lower temperature")
        return x

    def anomaly_entry(self, name: str) -> ModelEntry:
        """The ready entry of a model with an anomaly calibration (400 for one without: checked before its input is read)."""
        entry = self.ready_entry(name)
        self.anomaly_scorer(entry)
        return entry

    def anomaly_scorer(self, entry: ModelEntry) -> AnomalyScorer:
        """The entry's calibrated scorer (400 for models without an anomaly calibration)."""
        manifest = entry.manifest
        if manifest.data_spec.kind not in ("record", "waveform") or not manifest.calibration:
            raise BadRequest(f"model {entry.name!r} has no anomaly calibration (only record and waveform models trained by flowserve have one)")
        if "anomaly_scorer" not in entry.extras:  # built once per loaded version (it sorts the calibration scores)
            entry.extras["anomaly_scorer"] = AnomalyScorer(manifest.calibration)
        return entry.extras["anomaly_scorer"]

    def pattern_calibrations(self, entry: ModelEntry) -> PatternCalibrations | None:
        """The entry's per-pattern calibrations for records with absent features (``None`` when its calibration predates them)."""
        cal = entry.manifest.calibration
        if cal is None or cal.proposal is None:
            return None
        if "pattern_calibrations" not in entry.extras:
            entry.extras["pattern_calibrations"] = PatternCalibrations(cal, entry.manifest.data_spec.discrete_features,
                                                                       samples=self.settings.anomaly_samples,
                                                                       cache=self.settings.anomaly_pattern_cache,
                                                                       cold_records=self.settings.anomaly_pattern_records)
        return entry.extras["pattern_calibrations"]

    async def _log_p(self, entry: ModelEntry, rows: np.ndarray, noise: np.ndarray | None, gone: Gone | None) -> np.ndarray:
        """``log p`` of any number of rows through the entry's score batcher, in chunks of a quarter of its queue."""
        if not len(rows):
            return np.zeros(0)
        batcher = entry.batcher("score")
        payload = {"x": rows} if noise is None else {"x": rows, "noise": noise}
        out = [await batcher.submit(chunk, self.settings.request_timeout_s, gone)
               for chunk in row_chunks(payload, max(1, self.settings.max_queue_rows // 4))]
        return np.concatenate(out)

    async def pattern_scorer(self, entry: ModelEntry, pcal: PatternCalibrations, pattern: Pattern) -> AnomalyScorer:
        """The pattern's calibrated scorer: stored in the artifact, cached, or built once for the whole server.

        A front-end process asks the executor serving the model (``repository.pattern_calibration``),
        which builds each (model version, pattern) once for every front-end; a single-process
        server and the executor itself build it here (:meth:`build_pattern`). Concurrent requests
        for a new pattern share one build.
        """
        cached = pcal.cached(pattern)
        if cached is not None:
            return cached
        builds: dict = entry.extras.setdefault("pattern_builds", {})
        task = builds.get(pattern)
        if task is None:
            remote = getattr(self.repository, "pattern_calibration", None)  # only the front-ends' RemoteRepository has one

            async def build() -> AnomalyScorer:
                try:
                    if remote is not None:
                        return pcal.adopt(pattern, await remote(entry, pattern))
                    return await self.build_pattern(entry, pcal, pattern)
                finally:
                    builds.pop(pattern, None)

            task = builds[pattern] = asyncio.ensure_future(build())
        try:
            return await asyncio.shield(task)
        except NoPatternCalibration as e:
            raise BadRequest(f"records: {e}; send more of its features or use missing='median'") from None

    async def build_pattern(self, entry: ModelEntry, pcal: PatternCalibrations, pattern: Pattern) -> AnomalyScorer:
        """Build a pattern's calibration here: its calibration records' rows through the entry's score batcher,
        a few patterns at a time so that builds never fill the queue; counted in ``pattern_calibrations_built``."""
        slots: asyncio.Semaphore = entry.extras.setdefault("pattern_build_slots", asyncio.Semaphore(BUILD_SLOTS))
        async with slots:
            plan, records = pcal.calibration_plan(pattern)
            scorer = pcal.build(pattern, plan, records, await self._log_p(entry, plan.rows, plan.noise, None))
        if self.metrics is not None:
            self.metrics.pattern_builds.labels(entry.name).inc()
        return scorer

    async def anomaly(self, entry: ModelEntry, x: np.ndarray, target_fpr: float = 0.01, statistic: str | None = None,
                      explain: Explain = "anomalies", segments: int = 16, top: int = 5, field: str = "records",
                      gone: Gone | None = None, observed: np.ndarray | None = None, missing: Missing = "marginal",
                      stream: str | None = None) -> AnomalyReport:
        """Calibrated anomaly scores of validated rows ``x``, with counterfactual attributions.

        Per row (see :meth:`models.anomaly.scoring.AnomalyScorer.assess`): ``nll`` and ``nll_per_dim``
        (nats; per observed feature for records with absent ones), ``percentile``, conformal
        ``p_value``, ``is_anomaly`` at ``target_fpr``, ``threshold``; and ``attribution`` (top
        ``top`` features, feature groups or time segments: nats of the statistic that disappear
        when that part is made typical) for the rows ``explain`` picks.

        Records: ``observed (N, D)`` marks the features the client sent; absent ones (whatever ``x``
        holds there) are filled here with the calibration medians (:func:`impute`). ``missing="marginal"``
        scores them by the marginal likelihood of the observed features against calibration records
        masked to the same pattern (:mod:`models.anomaly.missing`); ``"median"`` scores the median-filled
        record against the complete records' calibration. Only observed features are attributed. All rows of a request, of
        every pattern, go to the batcher as one stream of rows.

        Drift (``FLOWSERVE_DRIFT``): the rows' p-values, in request order, then feed the detector of
        ``stream`` (``"default"`` when none is named) and the report carries its reading (:meth:`drift`).
        """
        name, manifest, spec = entry.name, entry.manifest, entry.manifest.data_spec
        scorer = self.anomaly_scorer(entry)
        try:
            statistic = scorer.resolve(statistic)
        except ValueError as e:
            raise BadRequest(f"statistic: {e}") from None
        self._check_rows(len(x), field)
        if spec.kind == "record" and observed is not None:
            x = impute(spec, manifest.calibration.fill, x, observed, field)
        pcal = self.pattern_calibrations(entry) if spec.kind == "record" else None
        groups: dict[Pattern, np.ndarray] = {tuple(range(spec.dims)) if spec.kind == "record" else (): np.arange(len(x))}
        if spec.kind == "record" and observed is not None:  # records grouped by their pattern of observed features
            if missing == "marginal" and pcal is None and not observed.all():
                raise BadRequest(f"missing: model {name!r} was calibrated before absent features were supported; recalibrate "
                                 "it (`flowserve calibrate`) or use missing='median'")
            rows_of: dict[Pattern, list[int]] = {}
            for i, row in enumerate(np.asarray(observed, dtype=bool)):
                rows_of.setdefault(pattern_of(row), []).append(i)
            groups = {p: np.asarray(idx) for p, idx in rows_of.items()}

        def marginal(pattern: Pattern) -> bool:
            return spec.kind == "record" and missing == "marginal" and len(pattern) < spec.dims

        built = await asyncio.gather(*(self.pattern_scorer(entry, pcal, p) for p in groups if marginal(p)))
        scorers = dict(zip([p for p in groups if marginal(p)], built))

        def plan(pattern: Pattern, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, Callable[[np.ndarray], np.ndarray]]:
            """Rows for the flow, their noise, and log p of the rows → NLL (nats) of the records."""
            if marginal(pattern):
                p = pcal.plan(rows, pattern)  # type: ignore[union-attr]
                return p.rows, p.noise, lambda lp: -p.combine(lp)
            noise = scoring_noise(spec, len(rows))
            return rows, noise, lambda lp: -np.asarray(lp, dtype=np.float64)

        nll_by = await self._nll_many(entry, [plan(p, x[idx]) for p, idx in groups.items()], gone)
        results: list[Assessment] = [None] * len(x)  # type: ignore[list-item]
        cal_n = np.zeros((2, len(x)), dtype=np.int64)  # calibration scores behind each row's p-value, and their units
        explained: list[tuple[Pattern, AnomalyScorer, np.ndarray, np.ndarray]] = []  # pattern, scorer, request rows, base NLL
        names = spec.feature_names or []
        for (pattern, idx), nll in zip(groups.items(), nll_by):
            check_support(spec, x[idx], -nll, field, idx)
            sc = scorers.get(pattern, scorer)
            cal_n[:, idx] = [[sc.n], [sc.units]]
            part = sc.assess(nll, len(pattern) if marginal(pattern) else spec.dims, target_fpr, statistic, x[idx])
            absent = [n for j, n in enumerate(names) if j not in set(pattern)] if spec.kind == "record" else None
            for i, r in zip(idx, part):
                r.absent, r.imputed = absent, (absent if missing == "median" else None)
                results[i] = r
            pick = [k for k, r in enumerate(part) if explain == "all" or (explain == "anomalies" and r.is_anomaly)]
            if pick:
                explained.append((pattern, sc, idx[pick], nll[pick]))
        if explained and (spec.kind == "waveform" or manifest.calibration.reference is not None):
            await self._explain(entry, explained, x, statistic, segments, top, plan, gone, results)
        drift = None
        if self.settings.drift:
            p = np.array([r.p_value for r in results], dtype=np.float64)
            drift = (await self.drift(entry, "update", stream or DEFAULT_STREAM, p, *cal_n))[0]
        record = spec.kind == "record"
        used = CalibrationUsed(method=manifest.calibration.method, n=manifest.calibration.n, missing=missing if record else None,
                               samples=pcal.samples if pcal is not None and missing == "marginal" else None)
        return AnomalyReport(entry, statistic, results, used, drift)

    # --- drift ---------------------------------------------------------------------------------

    def drift_entry(self, name: str) -> ModelEntry:
        """The ready entry of a model with an anomaly calibration, for the drift routes (404 when drift tracking is off)."""
        if not self.settings.drift:
            raise NotFound("drift tracking is off on this server (FLOWSERVE_DRIFT=false)")
        return self.anomaly_entry(name)

    async def drift(self, entry: ModelEntry, action: DriftAction, stream: str | None = None, p: np.ndarray | None = None,
                    n: np.ndarray | None = None, units: np.ndarray | None = None) -> list[dict]:
        """A drift action on ``entry``'s monitor, wherever it lives (:mod:`service.core.drift`): ``update`` feeds
        p-values ``p (N,)`` against ``n (N,)`` calibration scores from ``units (N,)`` patients to ``stream`` and
        returns its reading;
        ``readings`` returns one stream's or every stream's; ``reset`` forgets one stream or all and
        returns ``{"stream"}`` for each."""
        remote = getattr(self.repository, "drift", None)  # only the front-ends' RemoteRepository has one
        if remote is not None:
            return await remote(entry, action, stream, p, n, units)
        return self.drift_here(entry, action, stream, p, n, units)

    def drift_here(self, entry: ModelEntry, action: DriftAction, stream: str | None = None, p: np.ndarray | None = None,
                   n: np.ndarray | None = None, units: np.ndarray | None = None) -> list[dict]:
        """:meth:`drift` in the process that holds the model version's monitor."""
        if "drift" not in entry.extras:
            entry.extras["drift"] = DriftMonitor(self.settings.drift_config(), self.settings.drift_streams)
        monitor: DriftMonitor = entry.extras["drift"]
        if action == "update":
            assert stream is not None and p is not None and n is not None and units is not None
            reading, raised = monitor.update(stream, p, n, units)
            if raised:
                log.warning("drift alarm on model %s version %s, stream %r, at record %d (%s)", entry.name, entry.version,
                            stream, reading.alarm_at, reading.direction)
                if self.metrics is not None:
                    self.metrics.drift_alarms.labels(entry.name).inc()
            return [reading_dict(stream, reading)]
        if action == "readings":
            return [reading_dict(s, r) for s, r in monitor.readings(stream).items()]
        return [{"stream": s} for s in monitor.reset(stream)]

    def drift_rows(self) -> list[tuple[str, str, dict]]:
        """``(model, version, reading)`` of every tracked stream of the models computing in this process."""
        return [(e.name, e.version, r) for e in list(self.repository.models.values()) if "drift" in e.extras
                for r in self.drift_here(e, "readings")]

    async def _nll_many(self, entry: ModelEntry, plans: list[tuple[np.ndarray, np.ndarray | None, Callable]], gone: Gone | None) -> list[np.ndarray]:
        """Score the rows of several plans as one stream through the batcher; each plan's NLLs."""
        sizes = [len(p[0]) for p in plans]
        rows = np.concatenate([p[0] for p in plans])
        noise = None if plans[0][1] is None else np.concatenate([p[1] for p in plans])
        lp = np.split(await self._log_p(entry, rows, noise, gone), np.cumsum(sizes)[:-1])
        return [p[2](v) for p, v in zip(plans, lp)]

    async def _explain(self, entry: ModelEntry, explained: list, x: np.ndarray, statistic: str, segments: int, top: int,
                       plan: Callable, gone: Gone | None, results: list[Assessment]) -> None:
        """Attributions for the chosen rows of each pattern, all variants scored as one stream."""
        manifest, spec = entry.manifest, entry.manifest.data_spec
        jobs, plans, extra = [], [], 0
        for pattern, sc, idx, nll in explained:
            attributed = np.asarray(pattern) if spec.kind == "record" else None
            variants, describe = _attribution_plan(spec, manifest.calibration, x[idx], segments, top, attributed)
            rows, noise, combine = plan(pattern, variants)
            extra += len(rows)
            jobs.append((sc, idx, nll, variants, describe))
            plans.append((rows, noise, combine))
        if extra > self.settings.max_queue_rows * 16:
            n = sum(len(j[1]) for j in jobs)
            raise BadRequest(f"explain: {n} records need {extra} extra rows (limit {self.settings.max_queue_rows * 16}); "
                             "send fewer records or set explain to 'anomalies' or 'none'")
        for (sc, idx, nll, variants, describe), v_nll in zip(jobs, await self._nll_many(entry, plans, gone)):
            # A variant the model cannot represent removes nothing from the score.
            v_nll = np.where(np.isfinite(v_nll), v_nll, np.inf)
            base = sc.statistic(nll, statistic, x[idx])
            v_stat = np.where(np.isfinite(v_nll), sc.statistic(np.nan_to_num(v_nll, posinf=0.0), statistic, variants), np.inf)
            for i, a in zip(idx, describe(base, v_stat)):
                results[i].attribution = a


def _attribution_plan(spec: DataSpec, calibration: Calibration, x: np.ndarray, segments: int, top: int,
                      observed: np.ndarray | None = None):  # noqa: ANN202
    """Variant rows to score and a function (statistic, variant statistic) → attribution lists.

    Records: the observed features (``observed`` indices; all when ``None``) and the schema's feature groups.
    """
    if spec.kind == "record":
        parts, labels, members = attr.record_parts(spec, calibration, observed, x)
        m = parts[0][1].shape[-2]

        def describe(s: np.ndarray, v: np.ndarray) -> list[list[dict]]:
            return attr.describe_parts(attr.part_attribution(s, v, len(parts), m), labels, members, top)

        return attr.part_variants(x, parts), describe
    bounds = attr.segment_bounds(spec.shape[-1], segments)

    def describe(s: np.ndarray, v: np.ndarray) -> list[list[dict]]:
        a = attr.segment_attribution(s, v, segments)
        return [[{"segment": int(j), "start": int(bounds[j][0]), "end": int(bounds[j][1]), "nats": float(row[j])}
                 for j in np.argsort(-row, kind="stable")[:top]] for row in a]

    return attr.segment_variants(x, segments), describe
