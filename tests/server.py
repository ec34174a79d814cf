"""Start a real ``flowserve serve`` process on loopback for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw) -> httpx.Client:  # noqa: ANN003
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@contextmanager
def running_server(repository: Path, tmp: Path, **env: str) -> Iterator[Server]:
    """Run the service until the block ends; waits for ``/v2/health/ready``."""
    port = free_port()
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "FLOWSERVE_REPOSITORY": str(repository), "FLOWSERVE_DEVICES": "cpu", **env}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "models.cli", "serve", "--port", str(port)], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 60 s:\n{log.read_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
