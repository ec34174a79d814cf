"""Request-scoped dependencies: the service state and its inference core."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from service.core.entry import Repository
from service.core.inference import InferenceCore
from service.metrics import Metrics
from service.settings import Settings


@dataclass
class ServiceState:
    """Everything one app instance owns (kept on ``app.state.service``; no module globals)."""

    settings: Settings
    metrics: Metrics
    repository: Repository
    core: InferenceCore
    draining: bool = False
    inflight: int = 0


def state(request: Request) -> ServiceState:
    return request.app.state.service


def core(request: Request) -> InferenceCore:
    return state(request).core
