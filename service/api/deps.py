"""Request-scoped dependencies: the service state and its inference core."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from ..core import InferenceCore
from ..metrics import Metrics
from ..settings import Settings


@dataclass
class ServiceState:
    """Everything one app instance owns (kept on ``app.state.service``; no module globals)."""

    settings: Settings
    metrics: Metrics
    repository: object  # ModelRepository (in-process) or frontend.RemoteRepository: models, get, reload, not_ready_reason
    core: InferenceCore
    draining: bool = False
    inflight: int = 0
    extras: dict = field(default_factory=dict)


def state(request: Request) -> ServiceState:
    return request.app.state.service


def core(request: Request) -> InferenceCore:
    return state(request).core
