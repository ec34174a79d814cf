"""The HTTP front-end process: its app over a :class:`~service.frontend.remote.RemoteRepository`, served by
uvicorn on the port every front-end shares (``python -m service.frontend``, started by the supervisor)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from service.frontend.api.deps import ServiceState
from service.frontend.app import build_app
from service.frontend.http import run_uvicorn
from service.frontend.remote import RemoteRepository
from service.heap import apply_heap_settings
from service.ipc.children import ChildSpec, child_logging, die_with_parent, read_child_spec, reuse_port_socket
from service.metrics import Metrics


def create_frontend_app(spec: ChildSpec) -> FastAPI:
    """An HTTP front-end's app: no model here; tensors go to the executor processes (:mod:`service.frontend.remote`)."""
    settings = spec.settings
    repository = RemoteRepository(settings, spec)

    async def start(service: ServiceState) -> list[asyncio.Task]:
        repository.start()
        # Serve only once this front-end knows what every executor serves, as the others do: its socket
        # is bound but not listening until then, so the kernel sends connections to the front-ends that know.
        await repository.first_tables(settings.frontend_start_wait_s)
        return []

    return build_app(settings, Metrics(), repository, start, repository.close)


def main() -> None:
    spec = read_child_spec()
    die_with_parent(spec.parent)
    child_logging("frontend", spec.index)
    apply_heap_settings(spec.settings)
    sock = reuse_port_socket(spec.settings.host, spec.port, backlog=None)  # listens once it knows the tables
    run_uvicorn(create_frontend_app(spec), spec.settings, sockets=[sock])
