"""Prometheus collectors, namespace ``flowserve_``, base units (seconds, bytes). One registry per app.

Every label takes values from a bounded set, so no client can grow the series count:

| label | values |
| --- | --- |
| ``model`` | names of models in the repository (directories on disk), or ``UNKNOWN_MODEL`` for any other name a URL carries, or ``""`` (rejections before a model is known) |
| ``version`` | versions on disk |
| ``endpoint`` | ``score``, ``sample``, ``anomaly``, ``infer`` (the route pattern in ``service.app``) |
| ``status`` | HTTP status codes the service answers |
| ``task`` | ``service.tasks.TASKS`` |
| ``reason`` | rejection reasons: ``queue_full``, ``timeout``, ``unauthorized`` |
| ``device`` | the configured devices |
"""

from __future__ import annotations

from collections.abc import Container

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        self.queue_depth = Gauge("queue_depth_rows", "Rows waiting in the batcher queue", ["model", "task"], namespace=ns, registry=r)
        self.rejections = Counter("rejections", "Requests rejected, by reason", ["model", "reason"], namespace=ns, registry=r)
        self.model_ready = Gauge("model_ready", "1 if the model is ready to serve", ["model", "version"], namespace=ns, registry=r)
        self.load_duration = Gauge("model_load_duration_seconds", "Time the last load of a model took", ["model", "version"], namespace=ns, registry=r)
        self.oom_retries = Counter("oom_retries", "CUDA out-of-memory errors recovered by halving the batch", ["model", "device"], namespace=ns, registry=r)
        self.device_memory = Gauge("device_memory_bytes", "Device memory allocated by the worker", ["device"], namespace=ns, registry=r)
        self.inflight = Gauge("inflight_requests", "Inference requests being served", namespace=ns, registry=r)

    @staticmethod
    def model_label(name: str, known: Container[str]) -> str:
        """``name`` if the repository has it, else :data:`UNKNOWN_MODEL` (URLs carry arbitrary names)."""
        return name if name in known else UNKNOWN_MODEL
