"""Run the service under uvicorn with graceful draining and reload on SIGHUP.

SIGTERM/SIGINT: readiness turns 503 at once and new inference requests are refused; in-flight
requests finish (bounded by ``drain_timeout_s``); then uvicorn shuts down. SIGHUP reloads the
model repository.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import uvicorn

from .app import create_app
from .settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before shutdown."""

    def __init__(self, config: uvicorn.Config, service) -> None:  # noqa: ANN001
        super().__init__(config)
        self.service = service
        self._draining_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        if sig == signal.SIGHUP:
            asyncio.get_event_loop().create_task(self.service.repository.reload())
            return
        if self.service.draining:  # second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.draining = True
        log.info("draining: readiness is 503, waiting up to %.0f s for %d in-flight requests",
                 self.service.settings.drain_timeout_s, self.service.inflight)
        self._draining_task = asyncio.get_event_loop().create_task(self._drain_then_exit(sig, frame))

    async def _drain_then_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        deadline = time.monotonic() + self.service.settings.drain_timeout_s
        while self.service.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)

    def install_signal_handlers(self) -> None:
        super().install_signal_handlers()
        try:
            asyncio.get_event_loop().add_signal_handler(signal.SIGHUP, self.handle_exit, signal.SIGHUP, None)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass


def serve(settings: Settings) -> None:
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=settings.drain_timeout_s)
    DrainingServer(config, app.state.service).run()
