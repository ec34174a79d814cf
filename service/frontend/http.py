"""Serving an app with uvicorn, draining before shutdown: what the single-process server and each HTTP front-end run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Iterator

import uvicorn

from service.settings import Settings

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain phase before shutdown.

    SIGTERM/SIGINT: readiness turns 503 at once and new inference requests are refused; in-flight
    requests finish (bounded by ``drain_timeout_s``); then uvicorn shuts down and, as uvicorn does,
    re-raises the signal. SIGHUP reloads the model repository.
    """

    def __init__(self, config: uvicorn.Config, service) -> None:  # noqa: ANN001
        super().__init__(config)
        self.service = service
        self._draining_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        """SIGTERM/SIGINT: start draining; a second signal stops at once."""
        if self.service.draining:
            return super().handle_exit(sig, frame)
        self.service.draining = True
        log.info("draining: readiness is 503, waiting up to %.0f s for %d in-flight requests",
                 self.service.settings.drain_timeout_s, self.service.inflight)
        self._schedule(self._drain_then_exit(sig, frame))

    def _on_sighup(self, sig: int, frame) -> None:  # noqa: ANN001
        log.info("SIGHUP: reloading the model repository")
        self._schedule(self.service.core.reload())

    def _schedule(self, coro) -> None:  # noqa: ANN001
        """Run ``coro`` on the server's loop (signal handlers run between bytecodes of the main thread)."""
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: setattr(self, "_draining_task", loop.create_task(coro)))

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """uvicorn's SIGTERM/SIGINT capture, plus SIGHUP for reload."""
        with super().capture_signals():
            previous = signal.signal(signal.SIGHUP, self._on_sighup)
            try:
                yield
            finally:
                signal.signal(signal.SIGHUP, previous)

    async def _drain_then_exit(self, sig: int, frame) -> None:  # noqa: ANN001
        deadline = time.monotonic() + self.service.settings.drain_timeout_s
        while self.service.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        super().handle_exit(sig, frame)


def run_uvicorn(app, settings: Settings, sockets: list[socket.socket] | None = None) -> None:  # noqa: ANN001
    """Serve ``app`` (on ``sockets`` when given, else on the settings' host and port) until drained.

    HTTP runs on asyncio's event loop, not uvloop: libuv (≥ 1.45) accepts one connection per turn of
    the loop, and a saturated server's turns are long, so new connections waited seconds to minutes
    in the accept queue (``bench/fresh_connections.py``); asyncio accepts every pending connection
    on each readiness event. Executors, which accept only their front-ends, keep uvloop.
    """
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", access_log=settings.access_log,
                            timeout_graceful_shutdown=settings.drain_timeout_s, backlog=settings.listen_backlog,
                            loop="asyncio")
    DrainingServer(config, app.state.service).run(sockets=sockets)
