"""Anomaly scores for records with absent features: the marginal NLL, calibrated per missingness pattern.

A record with features ``o`` observed (its *pattern*) is scored by ``−log p̂(x_o)``
(:mod:`models.anomaly.marginal`), and its p-value compares that score with the calibration records masked
to the same pattern and scored by the same estimator with the same draws
(:func:`models.anomaly.scoring.pattern_calibration`). The realised false-positive rate then holds for
each pattern, not only on average.

Where calibrations come from:

* **Stored** (warm): training and ``flowserve calibrate`` build the :data:`STORED_PATTERNS` most
  frequent patterns of what the training records measured (:func:`frequent_patterns`,
  :func:`calibrate_patterns`) into the manifest (``calibration.patterns``), each from up to
  :data:`~models.anomaly.scoring.MAX_PATTERN_RECORDS` calibration records. A server starts warm for them.
* **Built on first use** (cold): any other pattern, from at most :data:`COLD_PATTERN_RECORDS`
  calibration records (evenly spaced over those that know the pattern's features), kept in a
  bounded LRU cache. Building one costs ``n × K`` flow rows; the cap makes a cold pattern about
  five times cheaper than the stored ones, at a p-value resolution of ``1/(n + 1)`` (1/201).

Everything here is synchronous numpy: the caller runs the flow (the service through its batcher,
benchmarks and tests through :func:`models.anomaly.scoring.model_scorer`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..artifacts.manifest import Calibration
from .marginal import DEFAULT_SAMPLES, MarginalPlan, Pattern, Proposal, pattern_of, plan
from .scoring import AnomalyScorer, pattern_calibration, pattern_records

Score = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
CACHE_PATTERNS = 1024
STORED_PATTERNS = 128  # most frequent missingness patterns calibrated into the artifact (88% of the vitals training records)
COLD_PATTERN_RECORDS = 200  # calibration records behind a pattern built on first use (resolution 1/201)
MIN_PATTERN_RECORDS = 20  # fewer usable calibration records: the pattern cannot be calibrated


def frequent_patterns(measured: np.ndarray, top: int = STORED_PATTERNS) -> list[Pattern]:
    """The ``top`` most frequent patterns of ``measured (N, D)`` (which cells each record measured),
    most frequent first, leaving out the complete pattern (scored exactly) and the empty one."""
    from collections import Counter

    measured = np.asarray(measured, dtype=bool)
    counts = Counter(pattern_of(row) for row in measured)
    counts.pop(tuple(range(measured.shape[1])), None)
    counts.pop((), None)
    return [p for p, _ in counts.most_common(top)]


def calibrate_patterns(calibration: Calibration, discrete: list[int] | None, patterns: list[Pattern], score: Score,
                       samples: int = DEFAULT_SAMPLES) -> list[Calibration]:
    """Pattern calibrations (:func:`~models.anomaly.scoring.pattern_calibration`, ``samples`` = K recorded) for
    ``patterns``, from every usable calibration record; patterns with too few usable records are left out."""
    pcal = PatternCalibrations(calibration, discrete, samples=samples, cache=len(patterns), cold_records=None)
    out = []
    for pattern in patterns:
        try:
            cal = pcal.scorer(pattern, score).calibration
        except NoPatternCalibration:
            continue
        rounded = {key: np.round(getattr(cal, key), 6).tolist() for key in ("scores", "conditional_scores")  # µnat resolution
                   if getattr(cal, key) is not None}  # keeps the manifest small
        out.append(cal.model_copy(update=rounded))
    return out


class NoPatternCalibration(ValueError):
    """Too few calibration records know every feature of the pattern."""


class PatternCalibrations:
    """Per-pattern scorers for one model's calibration (the manifest's :class:`Calibration`)."""

    def __init__(self, calibration: Calibration, discrete: list[int] | None, samples: int = DEFAULT_SAMPLES,
                 cache: int = CACHE_PATTERNS, min_records: int = MIN_PATTERN_RECORDS,
                 cold_records: int | None = COLD_PATTERN_RECORDS) -> None:
        if calibration.proposal is None or calibration.records is None:
            raise ValueError("this model's calibration has no proposal and records for absent features "
                             "(calibrated before they existed); recalibrate it with `flowserve calibrate`")
        self.calibration = calibration
        self.discrete = discrete
        self.samples = samples
        self.min_records = min_records
        self.cold_records = cold_records
        self.proposal = Proposal.from_dict(calibration.proposal)
        self.records = np.asarray(calibration.records, dtype=np.float32)
        self.stored: dict[Pattern, AnomalyScorer] = {  # built with the same K: the same estimator as the requests'
            tuple(c.pattern or ()): AnomalyScorer(c) for c in calibration.patterns or [] if c.samples == samples}
        self._cache: OrderedDict[Pattern, AnomalyScorer] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    def plan(self, x: np.ndarray, pattern: Pattern) -> MarginalPlan:
        """Rows to score for records ``x (N, D)`` of ``pattern`` (absent cells of ``x`` are ignored)."""
        return plan(x, pattern, self.proposal, self.discrete, self.samples)

    def cached(self, pattern: Pattern) -> AnomalyScorer | None:
        """The pattern's scorer if it is stored in the artifact or was built already, else ``None``."""
        if pattern in self.stored:
            return self.stored[pattern]
        with self._lock:
            scorer = self._cache.get(pattern)
            if scorer is not None:
                self._cache.move_to_end(pattern)
            return scorer

    def calibration_plan(self, pattern: Pattern) -> tuple[MarginalPlan, np.ndarray]:
        """Rows that calibrate ``pattern``, and the calibration records they come from ``(n, D)``."""
        idx = pattern_records(self.calibration, pattern)
        if len(idx) < self.min_records:
            raise NoPatternCalibration(f"only {len(idx)} calibration records measured all of this record's features "
                                       f"(need {self.min_records})")
        if self.cold_records is not None and len(idx) > self.cold_records:  # evenly spaced over the usable records
            idx = idx[np.linspace(0, len(idx) - 1, self.cold_records).round().astype(int)]
        records = self.records[idx]
        return self.plan(records, pattern), records

    def build(self, pattern: Pattern, plan_: MarginalPlan, records: np.ndarray, log_p_rows: np.ndarray) -> AnomalyScorer:
        """The pattern's scorer from the flow's log-densities of ``plan_.rows``; cached (LRU)."""
        nll = -plan_.combine(log_p_rows)
        return self.adopt(pattern, pattern_calibration(self.calibration, pattern, nll, records, self.samples))

    def adopt(self, pattern: Pattern, calibration: Calibration) -> AnomalyScorer:
        """Cache (LRU) and return the scorer of a pattern calibration built here or elsewhere (the service's executor)."""
        scorer = AnomalyScorer(calibration)
        with self._lock:
            self._cache[pattern] = scorer
            self._cache.move_to_end(pattern)
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return scorer

    def scorer(self, pattern: Pattern, score: Score) -> AnomalyScorer:
        """The pattern's scorer, built with ``score`` (synchronous) when not cached."""
        cached = self.cached(pattern)
        if cached is not None:
            return cached
        p, records = self.calibration_plan(pattern)
        return self.build(pattern, p, records, score(p.rows, p.noise))

    def log_marginal(self, x: np.ndarray, pattern: Pattern, score: Score) -> np.ndarray:
        """``log p̂(x_o)`` (nats, ``(N,)``) of records ``x`` of one pattern."""
        p = self.plan(x, pattern)
        return p.combine(score(p.rows, p.noise))
