"""Pure-ASGI middleware of the front end: request ids and request metrics.

Order (outermost first): :class:`RequestIdMiddleware`, :class:`MetricsMiddleware`, then the app.
"""

from __future__ import annotations

import re
import time
import uuid

from .api.deps import ServiceState

REQUEST_ID = "X-Request-ID"
CLIENT_CLOSED = 499  # the status counted for a request whose client left before the answer (nginx's convention)
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_ROUTE = re.compile(r"^/v(?P<api>[12])/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/(?P<endpoint>score|sample|anomaly|infer)$")


class RequestIdMiddleware:
    """Gives each HTTP request an id (the client's ``X-Request-ID`` if it is sane, else a new one) and echoes it."""

    def __init__(self, app) -> None:  # noqa: ANN001
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(REQUEST_ID.lower().encode(), b"").decode("latin-1")
        rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (REQUEST_ID.lower().encode(), rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


class MetricsMiddleware:
    """Counts requests and latency for inference routes, and tracks in-flight work (pure ASGI)."""

    def __init__(self, app, service: ServiceState) -> None:  # noqa: ANN001
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        m = _ROUTE.match(scope.get("path", "")) if scope["type"] == "http" else None
        if m is None:
            return await self.app(scope, receive, send)
        status = {"code": CLIENT_CLOSED}

        async def send_wrapper(message) -> None:  # noqa: ANN001
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        metrics, t0 = self.service.metrics, time.perf_counter()
        # A request that arrived before draining began is served; only later arrivals get 503.
        scope.setdefault("state", {})["arrived_draining"] = self.service.draining
        self.service.inflight += 1
        metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            status["code"] = 500
            raise
        finally:
            self.service.inflight -= 1
            metrics.inflight.dec()
            model, endpoint = metrics.model_label(m["model"], self.service.repository.models), m["endpoint"]
            metrics.requests.labels(model, endpoint, str(status["code"])).inc()
            metrics.request_duration.labels(model, endpoint).observe(time.perf_counter() - t0)
