"""Anomaly scores for records with absent features: the marginal NLL, calibrated per missingness pattern.

A record with features ``o`` observed (its *pattern*) is scored by ``−log p̂(x_o)``
(:mod:`models.marginal`), and its p-value compares that score with the calibration records masked
to the same pattern and scored by the same estimator with the same draws
(:func:`models.anomaly.pattern_calibration`). The realised false-positive rate then holds for
each pattern, not only on average. Calibrations are built on first use and kept in a bounded
LRU cache (:class:`PatternCalibrations`); building one costs ``n × K`` flow rows
(``n ≤`` :data:`~models.anomaly.MAX_PATTERN_RECORDS`).

Everything here is synchronous numpy: the caller runs the flow (the service through its batcher,
benchmarks and tests through :func:`models.anomaly.model_scorer`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from .anomaly import AnomalyScorer, pattern_calibration, pattern_records
from .marginal import DEFAULT_SAMPLES, MarginalPlan, Pattern, Proposal, plan

Score = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
CACHE_PATTERNS = 1024


class NoPatternCalibration(ValueError):
    """Too few calibration records know every feature of the pattern."""


class PatternCalibrations:
    """Per-pattern scorers for one model's calibration (the manifest's ``calibration`` dict)."""

    def __init__(self, calibration: dict, discrete: list[int] | None, samples: int = DEFAULT_SAMPLES,
                 cache: int = CACHE_PATTERNS, min_records: int = 20) -> None:
        if "proposal" not in calibration or "records" not in calibration:
            raise ValueError("this model's calibration has no proposal and records for absent features "
                             "(calibrated before they existed); recalibrate it with `flowserve calibrate`")
        self.calibration = calibration
        self.discrete = discrete
        self.samples = samples
        self.min_records = min_records
        self.proposal = Proposal.from_dict(calibration["proposal"])
        self.records = np.asarray(calibration["records"], dtype=np.float32)
        self._cache: OrderedDict[Pattern, AnomalyScorer] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()

    def plan(self, x: np.ndarray, pattern: Pattern) -> MarginalPlan:
        """Rows to score for records ``x (N, D)`` of ``pattern`` (absent cells of ``x`` are ignored)."""
        return plan(x, pattern, self.proposal, self.discrete, self.samples)

    def cached(self, pattern: Pattern) -> AnomalyScorer | None:
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
        records = self.records[idx]
        return self.plan(records, pattern), records

    def build(self, pattern: Pattern, plan_: MarginalPlan, records: np.ndarray, log_p_rows: np.ndarray) -> AnomalyScorer:
        """The pattern's scorer from the flow's log-densities of ``plan_.rows``; cached (LRU)."""
        nll = -plan_.combine(log_p_rows)
        scorer = AnomalyScorer(pattern_calibration(self.calibration, pattern, nll, records))
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
