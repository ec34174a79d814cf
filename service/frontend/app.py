"""The FastAPI app around a repository (in-process or remote): lifespan, routes, middleware, and the one place
that maps errors to HTTP."""

from __future__ import annotations

import asyncio
import logging
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.artifacts.manifest import flowserve_version
from models.errors import FlowserveError
from service.core.drift import exposition as drift_exposition
from service.core.inference import InferenceCore
from service.errors import ServiceError, json_error
from service.frontend.api import v1, v2
from service.frontend.api.deps import ServiceState
from service.frontend.middleware import REQUEST_ID, GuardMiddleware, MetricsMiddleware, RequestIdMiddleware
from service.heap import freeze_heap, trim_malloc_every
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)


def request_id(request: Request) -> str:
    """The id :class:`~service.frontend.middleware.RequestIdMiddleware` gave this request (``X-Request-ID``)."""
    return request.scope.get("state", {}).get("request_id") or uuid.uuid4().hex


def install_error_handlers(app: FastAPI) -> None:
    """Every non-2xx body is ``{"error": "..."}``."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        if exc.status == 500:  # a fault an executor reported: logged here too, with the request's id
            rid = request_id(request)
            log.error("internal error on %s %s: %s (request id %s)", request.method, request.url.path, exc.message, rid)
            return json_error(500, f"internal error ({exc.message}); quote request id {rid}", {REQUEST_ID: rid}, rid)
        return json_error(exc.status, exc.message, exc.headers)

    @app.exception_handler(FlowserveError)
    async def user_error(request: Request, exc: FlowserveError) -> JSONResponse:
        return json_error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        return json_error(400, f"{'.'.join(map(str, err['loc']))}: {err['msg']}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return json_error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id(request)
        log.exception("unhandled error on %s %s (request id %s)", request.method, request.url.path, rid)
        return json_error(500, f"internal error ({type(exc).__name__}); quote request id {rid}", {REQUEST_ID: rid}, rid)


def build_app(settings: Settings, metrics: Metrics, repository, start, stop) -> FastAPI:  # noqa: ANN001
    """The app around a repository (in-process or remote): routes, errors, middleware, metrics.
    ``start()`` (async) runs in the lifespan before serving, ``stop()`` (async) after."""
    service = ServiceState(settings, metrics, repository, InferenceCore(settings, repository, metrics))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        background = await start(service)
        freeze_heap()
        trim = asyncio.create_task(trim_malloc_every(settings.malloc_trim_s))
        yield
        trim.cancel()
        service.draining = True
        for t in background:
            t.cancel()
        await stop()

    # /docs and /redoc with their JavaScript and CSS served from the fastapi-offline package, not a CDN: they work
    # on a closed network (a hospital's, say).
    app = FastAPIOffline(title="flowserve", version=flowserve_version(), lifespan=lifespan,
                  description="Exact log-likelihoods, anomaly scores and samples from normalizing flows.",
                  telemetry={"tracing": False, "metrics": False, "logs": False})  # Prometheus (service.metrics) instead
    app.state.service = service
    install_error_handlers(app)
    # The codecs' routes go on the app's own router, not through ``include_router``: FastAPI wraps an
    # included router in a lazily resolved layer that each request walks through, ~30 µs of a 1-row
    # request's ~450 µs in a front-end (docs/benchmarks.md). The routes carry their own prefix and tags.
    app.router.routes.extend([*v1.router.routes, *v2.router.routes])
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(GuardMiddleware, service=service)
    app.add_middleware(MetricsMiddleware, service=service)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, ctype = metrics.exposition()
        if settings.drift:  # the live streams' drift gauges, from wherever the monitors live (service.core.drift)
            remote = getattr(repository, "drift_rows", None)  # the front-ends' RemoteRepository reads the executors' tables
            rows = remote() if remote is not None else service.core.drift_rows()
            body += drift_exposition(rows)  # the families are there before any stream, as every labelled metric's
        return Response(body, media_type=ctype)

    return app
