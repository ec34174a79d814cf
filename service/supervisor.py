"""The supervisor: starts, watches, restarts and stops the executor and HTTP front-end processes.

It supervises:

* one **model-executor** process per device (:mod:`service.executor`): models, batchers, compute;
* ``http_workers`` **front-end** processes (:mod:`service.frontend`), all accepting on the one
  port (``SO_REUSEPORT``): HTTP, validation, the inference core; tensors go to the executors
  through shared memory.

Supervision: an executor that dies (killed, or exiting after a device fault) is started again
at once (then with a growing pause if it keeps dying) and reloads its models; front-ends answer
its in-flight requests 503 with Retry-After and stay up. A front-end that dies is started again.
SIGTERM/SIGINT: the front-ends drain (readiness 503, new requests 503, in-flight requests
finish, bounded by ``drain_timeout_s``), then the executors finish and exit; the supervisor
exits with status 0. A second SIGTERM/SIGINT stops everything at once. SIGHUP reloads the
repository in every executor. Metrics from every process are aggregated (multiprocess mode).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.ipc.children import CHILD_ENV, ChildSpec, available_cores, default_http_workers, reuse_port_socket
from service.ipc.transport import shm_root
from service.metrics import MULTIPROC_DIR
from service.settings import Settings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0)  # after the 1st, 2nd, ... quick death in a row
STABLE_S = 30.0  # a child that lived this long starts the backoff afresh


def resolve_devices(devices: list[str]) -> list[str]:
    """As :func:`service.executor.workers.resolve_devices`, asked in a short-lived interpreter: the supervisor
    never imports torch (nor holds a CUDA context or torch's memory)."""
    if devices not in (["auto"], []) and not any(d.startswith("cuda") for d in devices):
        return devices
    code = "import json, sys; from service.executor.workers import resolve_devices; print(json.dumps(resolve_devices(json.loads(sys.argv[1]))))"
    out = subprocess.run([sys.executable, "-c", code, json.dumps(devices)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "cannot resolve FLOWSERVE_DEVICES")
    return json.loads(out.stdout)


@dataclass
class Child:
    role: str
    index: int
    proc: subprocess.Popen | None = None
    incarnation: int = 0
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    history: list[int] = field(default_factory=list)  # pids


class Supervisor:
    """Starts, watches, restarts and stops the executor and front-end processes."""

    def __init__(self, settings: Settings) -> None:
        self.devices = resolve_devices(settings.devices)
        workers = settings.http_workers if settings.http_workers is not None else default_http_workers(len(self.devices))
        self.settings = settings.model_copy(update={"http_workers": workers})
        self.run_dir = Path(tempfile.mkdtemp(prefix="flowserve-"))
        self.shm_dir = Path(tempfile.mkdtemp(prefix="flowserve-", dir=shm_root()))
        self.metrics_dir = self.run_dir / "metrics"
        self.metrics_dir.mkdir()
        self.executors = [Child("executor", i) for i in range(len(self.devices))]
        self.frontends = [Child("frontend", i) for i in range(workers)]
        self.stopping = False
        self._frontends_told = False  # SIGTERM sent to the front-ends (once: a second one stops them at once)
        self._port_socket: socket.socket | None = None
        log.info("supervisor: %d executor(s) on %s, %d HTTP front-end(s) (%d cores available)",
                 len(self.devices), ",".join(self.devices), workers, available_cores())

    def _reserve_port(self) -> int:
        """Bind (not listen) the port with SO_REUSEPORT: resolves port 0 and keeps the port ours
        while front-ends come and go; only the front-ends' listening sockets receive connections."""
        sock = reuse_port_socket(self.settings.host, self.settings.port, backlog=None)
        self._port_socket = sock
        return sock.getsockname()[1]

    def _spawn(self, child: Child, port: int) -> None:
        spec = ChildSpec(role=child.role, index=child.index, incarnation=child.incarnation, run_dir=str(self.run_dir),
                         shm_dir=str(self.shm_dir), devices=self.devices, port=port, parent=os.getpid(), settings=self.settings)
        env = {**os.environ, CHILD_ENV: spec.model_dump_json(), MULTIPROC_DIR: str(self.metrics_dir)}
        module = "service.executor" if child.role == "executor" else "service.frontend"
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which then drains in order.
        child.proc = subprocess.Popen([sys.executable, "-m", module], env=env, start_new_session=True)
        child.started = time.monotonic()
        child.restart_at = None
        child.history.append(child.proc.pid)
        log.info("started %s %d (pid %d%s)", child.role, child.index, child.proc.pid,
                 f", restart {child.incarnation}" if child.incarnation else "")

    def _reap(self, child: Child, port: int) -> None:
        """Restart ``child`` if it died (not while stopping), pausing longer after each quick death."""
        if child.proc is None:
            return
        if child.restart_at is None:
            code = child.proc.poll()
            if code is None or self.stopping:
                return
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.proc.pid, str(self.metrics_dir))
            lived = time.monotonic() - child.started
            child.quick_deaths = 0 if lived > STABLE_S else child.quick_deaths + 1
            pause = RESTART_BACKOFF_S[min(child.quick_deaths, len(RESTART_BACKOFF_S) - 1)]
            log.error("%s %d (pid %d) exited with status %s after %.1f s; restarting in %.1f s",
                      child.role, child.index, child.proc.pid, code, lived, pause)
            child.restart_at = time.monotonic() + pause
        if time.monotonic() >= child.restart_at:
            child.incarnation += 1
            self._spawn(child, port)

    def _signal_all(self, children: list[Child], sig: int) -> None:
        for c in children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)

    def _wait(self, children: list[Child], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for c in children:
            if c.proc is None:
                continue
            try:
                c.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %d did not stop in time; killing it", c.role, c.index)
                c.proc.kill()
                c.proc.wait()

    def _on_signal(self, sig: int, signals: list[int]) -> None:
        """Record ``sig`` for the main loop; the first SIGTERM/SIGINT reaches the front-ends at once, so
        readiness turns 503 without waiting for the loop's next turn."""
        signals.append(sig)
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._tell_frontends_to_drain()

    def _tell_frontends_to_drain(self) -> None:
        """SIGTERM to the front-ends, once: a second SIGTERM would stop them without draining."""
        if not self._frontends_told:
            self._frontends_told = True
            self._signal_all(self.frontends, signal.SIGTERM)

    def run(self) -> None:
        signals: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self._on_signal(s, signals))
        try:
            port = self._reserve_port()
            for child in self.executors + self.frontends:
                self._spawn(child, port)
            log.info("serving on http://%s:%d", self.settings.host, port)
            while True:
                while signals:
                    sig = signals.pop(0)
                    if sig == signal.SIGHUP:
                        log.info("SIGHUP: every executor reloads the repository")
                        self._signal_all(self.executors, signal.SIGHUP)
                    elif self.stopping:  # a second SIGTERM/SIGINT: stop now
                        log.warning("second signal: stopping at once")
                        self._signal_all(self.frontends + self.executors, signal.SIGKILL)
                        return
                    else:
                        self.stopping = True
                        self._shutdown()
                        return
                for child in self.executors + self.frontends:
                    self._reap(child, port)
                time.sleep(0.05)
        finally:
            self._signal_all(self.frontends + self.executors, signal.SIGKILL)
            for c in self.frontends + self.executors:
                if c.proc is not None:
                    c.proc.wait()
            if self._port_socket is not None:
                self._port_socket.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)
            shutil.rmtree(self.shm_dir, ignore_errors=True)

    def _shutdown(self) -> None:
        """Front-ends drain first (their in-flight requests still need the executors), then executors stop."""
        log.info("stopping: front-ends drain (up to %.0f s), then executors stop", self.settings.drain_timeout_s)
        self._tell_frontends_to_drain()
        self._wait(self.frontends, self.settings.drain_timeout_s + 10)
        self._signal_all(self.executors, signal.SIGTERM)
        self._wait(self.executors, self.settings.drain_timeout_s + 5)
        log.info("stopped")

