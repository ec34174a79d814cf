"""The FastAPI application factory: lifespan, routes, one place mapping errors to HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.artifact import flowserve_version
from models.errors import FlowserveError

from .api import v1, v2
from .api.deps import ServiceState
from .core import InferenceCore
from .errors import ServiceError
from .memory import trim_malloc_every
from .metrics import Metrics
from .middleware import REQUEST_ID, MetricsMiddleware, RequestIdMiddleware
from .repository import ModelRepository
from .settings import Settings
from .workers import DeviceWorker, resolve_devices

log = logging.getLogger(__name__)


def _error(status: int, message: str, headers: dict[str, str] | None = None, request_id: str | None = None) -> JSONResponse:
    body = {"error": message} if request_id is None else {"error": message, "request_id": request_id}
    return JSONResponse(body, status_code=status, headers=headers)


def request_id(request: Request) -> str:
    """The id :class:`~service.middleware.RequestIdMiddleware` gave this request (``X-Request-ID``)."""
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    """Every non-2xx body is ``{"error": "..."}``."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(FlowserveError)
    async def user_error(request: Request, exc: FlowserveError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        return _error(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, rid)
        return _error(500, f"internal error ({type(exc).__name__}); quote request id {rid}", {REQUEST_ID: rid}, rid)


def default_cpu_threads(workers: list[DeviceWorker]) -> int:
    """Intra-op threads: leave one core to the event loop when the model computes on the CPU."""
    cores = os.cpu_count() or 1
    return max(1, cores - 1) if any(w.device == "cpu" for w in workers) else max(1, min(4, cores))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models load in the background once it starts (``/v2/health/ready`` tells when)."""
    settings = settings or Settings()
    metrics = Metrics()
    workers = [DeviceWorker(d) for d in resolve_devices(settings.devices)]
    torch.set_num_threads(settings.torch_threads or default_cpu_threads(workers))
    repository = ModelRepository(settings, workers, metrics)
    service = ServiceState(settings, metrics, workers, repository, InferenceCore(settings, repository))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        load = asyncio.create_task(service.repository.reload())
        service.extras["initial_load"] = load
        trim = asyncio.create_task(trim_malloc_every(settings.malloc_trim_s))
        yield
        trim.cancel()
        service.draining = True
        load.cancel()
        await service.repository.close()
        for w in workers:
            w.shutdown()

    app = FastAPI(title="flowserve", version=flowserve_version(), lifespan=lifespan,
                  description="Exact log-likelihoods, anomaly scores and samples from normalizing flows.")
    app.state.service = service
    install_error_handlers(app)
    app.include_router(v1.router)
    app.include_router(v2.router)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        for w in workers:
            mem = w.memory_allocated()
            if mem is not None:
                metrics.device_memory.labels(w.device).set(mem)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
