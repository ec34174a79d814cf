"""Request-scoped dependencies: the service state, API-key check, drain check."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from fastapi import Request

from ..core import InferenceCore
from ..errors import Unauthorized, Unavailable
from ..metrics import Metrics
from ..repository import ModelRepository
from ..settings import Settings
from ..workers import DeviceWorker


@dataclass
class ServiceState:
    """Everything one app instance owns (kept on ``app.state.service``; no module globals)."""

    settings: Settings
    metrics: Metrics
    workers: list[DeviceWorker]
    repository: ModelRepository
    core: InferenceCore
    draining: bool = False
    inflight: int = 0
    extras: dict = field(default_factory=dict)


def state(request: Request) -> ServiceState:
    return request.app.state.service


def core(request: Request) -> InferenceCore:
    return state(request).core


def require_key(request: Request) -> None:
    """Bearer API key check when ``FLOWSERVE_API_KEYS`` is set; also refuses work that arrived while draining
    (requests already in flight when SIGTERM came are served)."""
    s = state(request)
    if s.draining and request.scope.get("state", {}).get("arrived_draining", True):
        raise Unavailable("server is shutting down", "draining", 5)
    keys = s.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not any(hmac.compare_digest(token.strip(), k) for k in keys):
        s.metrics.rejections.labels("", "unauthorized").inc()
        raise Unauthorized()
