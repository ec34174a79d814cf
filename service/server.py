"""Run the service: in one process (``FLOWSERVE_HTTP_WORKERS=0``: HTTP and compute, a thread per device), or
under the :mod:`service.supervisor` (the default): an executor process per device and HTTP front-end processes."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service.frontend.http import run_uvicorn
from service.heap import apply_heap_settings
from service.ipc.children import available_cores
from service.metrics import Metrics
from service.settings import Settings
from service.supervisor import Supervisor

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)


def serve(settings: Settings) -> None:
    """Serve until SIGTERM: in one process when ``http_workers`` is 0, else supervised processes."""
    if settings.http_workers == 0:
        if apply_heap_settings(settings):
            log.info("malloc arenas capped at %d", settings.malloc_arenas)
        run_uvicorn(create_app(settings), settings)
        return
    Supervisor(settings).run()


# --- one process -----------------------------------------------------------------------------

def default_cpu_threads(devices: list[str]) -> int:
    """Intra-op threads of a single-process server: leave one core to the event loop when a model computes on the CPU."""
    cores = available_cores()
    return max(1, cores - 1) if "cpu" in devices else max(1, min(4, cores))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The single-process app (``FLOWSERVE_HTTP_WORKERS=0``): models load and compute in this process,
    in the background once it starts (``/v2/health/ready`` tells when)."""
    import torch

    from service.executor.repository import ModelRepository
    from service.executor.workers import DeviceWorker
    from service.executor.workers import resolve_devices as devices_here
    from service.frontend.api.deps import ServiceState
    from service.frontend.app import build_app

    settings = settings or Settings()
    metrics = Metrics()
    workers = [DeviceWorker(d) for d in devices_here(settings.devices)]
    torch.set_num_threads(settings.torch_threads or default_cpu_threads([w.device for w in workers]))
    repository = ModelRepository(settings, workers, metrics)

    async def publish_memory() -> None:
        while True:
            for w in workers:
                mem = w.memory_allocated()
                if mem is not None:
                    metrics.device_memory.labels(w.device).set(mem)
            await asyncio.sleep(2.0)

    async def start(service: ServiceState) -> list[asyncio.Task]:
        return [asyncio.create_task(repository.reload()), asyncio.create_task(publish_memory())]

    async def stop() -> None:
        await repository.close()
        for w in workers:
            w.shutdown()

    return build_app(settings, metrics, repository, start, stop)
