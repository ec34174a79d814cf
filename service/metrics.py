"""Prometheus collectors, namespace ``flowserve_``, base units (seconds, bytes). One registry per app.

With several processes (HTTP front-ends and model executors, :mod:`service.server`) every process
records into prometheus_client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, set by the
supervisor for its children) and any front-end's ``/metrics`` aggregates them all
(:func:`exposition`): counters and histograms are summed, gauges combined as each one's
``multiprocess_mode`` says (rows queued: the sum over live processes).

Every label takes values from a bounded set, so no client can grow the series count:

| label | values |
| --- | --- |
| ``model`` | names of models in the repository (directories on disk), or ``UNKNOWN_MODEL`` for any other name a URL carries, or ``""`` (rejections before a model is known) |
| ``version`` | versions on disk |
| ``endpoint`` | ``score``, ``sample``, ``anomaly``, ``infer`` (the route pattern in ``service.frontend.app``) |
| ``status`` | HTTP status codes the service answers |
| ``task`` | ``service.core.tasks.TASKS`` |
| ``reason`` | rejection reasons: ``queue_full``, ``timeout``, ``unauthorized`` |
| ``device`` | the configured devices |
| ``reason`` of ``fallbacks`` | ``mismatch``, ``error``, ``device_fault`` (``service.executor.selfcheck.REASONS``) |
"""

from __future__ import annotations

import os
from collections.abc import Container

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"

UNKNOWN_MODEL = "_unknown"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Metrics:
    """All collectors of one service instance, on their own registry (no global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ns = "flowserve"
        self.requests = Counter("requests", "HTTP requests by model, endpoint and status code", ["model", "endpoint", "status"], namespace=ns, registry=r)
        self.request_duration = Histogram("request_duration_seconds", "End-to-end request latency", ["model", "endpoint"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.queue_duration = Histogram("queue_duration_seconds", "Time a request waited in the batcher queue", ["model", "task"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.compute_duration = Histogram("compute_duration_seconds", "Model compute time per batch", ["model", "task", "device"], namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("batch_size_rows", "Rows per executed batch", ["model", "task"], namespace=ns, registry=r, buckets=BATCH_BUCKETS)
        self.queue_depth = Gauge("queue_depth_rows", "Rows waiting in the batcher queue", ["model", "task"], namespace=ns, registry=r,
                                 multiprocess_mode="livesum")
        self.rejections = Counter("rejections", "Requests rejected, by reason", ["model", "reason"], namespace=ns, registry=r)
        self.model_ready = Gauge("model_ready", "1 if the model is ready to serve", ["model", "version"], namespace=ns, registry=r,
                                 multiprocess_mode="livemax")
        self.load_duration = Gauge("model_load_duration_seconds", "Time the last load of a model took", ["model", "version"], namespace=ns,
                                   registry=r, multiprocess_mode="livemax")
        self.oom_retries = Counter("oom_retries", "CUDA out-of-memory errors recovered by halving the batch", ["model", "device"], namespace=ns, registry=r)
        self.device_memory = Gauge("device_memory_bytes", "Device memory allocated by the worker", ["device"], namespace=ns, registry=r,
                                   multiprocess_mode="livesum")
        self.inflight = Gauge("inflight_requests", "Inference requests being served", namespace=ns, registry=r, multiprocess_mode="livesum")
        self.pattern_builds = Counter("pattern_calibrations_built", "Missingness-pattern calibrations built on first use (once per "
                                      "model version and pattern for the whole server)", ["model"], namespace=ns, registry=r)
        self.drift_alarms = Counter("drift_alarms", "Drift alarms raised on the anomaly route's streams (service.core.drift)", ["model"],
                                    namespace=ns, registry=r)
        self.fallbacks = Counter("fallbacks", "Optimised paths switched off at load because they failed their self-check "
                                 "against the reference path (service.executor.selfcheck)", ["model", "task", "reason"], namespace=ns, registry=r)
        self.executor_restarts = Counter("executor_restarts", "Model-executor processes restarted after they died", ["device"],
                                         namespace=ns, registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition of this process's registry, or of every process's files in multiprocess mode."""
        if os.environ.get(MULTIPROC_DIR):
            registry = CollectorRegistry()
            registry.register(_AllProcesses(self.registry, os.environ[MULTIPROC_DIR]))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def model_label(name: str, known: Container[str]) -> str:
        """``name`` if the repository has it, else :data:`UNKNOWN_MODEL` (URLs carry arbitrary names)."""
        return name if name in known else UNKNOWN_MODEL


class _AllProcesses:
    """Every process's samples (prometheus_client's multiprocess files), plus this registry's families
    that no process has a sample of yet: their name and type are exported from the start, as in one process."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        self.registry, self.path = registry, path

    def collect(self):  # noqa: ANN201 - Iterable[Metric]
        from prometheus_client import multiprocess
        from prometheus_client.metrics_core import Metric

        seen = set()
        for family in multiprocess.MultiProcessCollector(None, self.path).collect():
            seen.add(family.name)
            yield family
        for family in self.registry.collect():
            if family.name not in seen:
                yield Metric(family.name, family.documentation, family.type)
