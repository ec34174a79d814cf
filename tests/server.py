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
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 60
        ready = 0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
            try:  # every HTTP front-end answers on the port; 8 fresh connections in a row ready ≈ all of them
                ready = ready + 1 if httpx.get(f"{server.url}/v2/health/ready", timeout=1).status_code == 200 else 0
            except httpx.HTTPError:
                ready = 0
            if ready >= 8:
                break
            if time.monotonic() > deadline:  # checked on every pass, a 503 answer too
                raise RuntimeError(f"server not ready in 60 s:\n{log.read_text()}")
            if ready == 0:
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def children(pid: int) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the direct children of ``pid`` (Linux ``/proc``)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                out.append((int(child), Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except FileNotFoundError:  # it exited meanwhile
                pass
    return out


def executor_pids(server: Server) -> list[int]:
    return [p for p, cmd in children(server.proc.pid) if "service.executor" in cmd]


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) * 1024
    return total + sum(tree_rss_bytes(c) for c, _ in children(pid))


def metric_samples(server: Server, family: str) -> list:
    """Samples of one metric family from the server's ``/metrics``, parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def metric_value(server: Server, sample: str, **labels: str) -> float:
    """Sum of the samples named ``sample`` whose labels include ``labels``."""
    family = sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum").removesuffix("_bucket")
    return sum(s.value for s in metric_samples(server, family) if s.name == sample and labels.items() <= s.labels.items())


def wait_for_metric(server: Server, sample: str, predicate, timeout_s: float = 30.0, **labels: str) -> float:  # noqa: ANN001
    """Wait until ``predicate(value)`` holds for a metric; returns the value (fails after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = metric_value(server, sample, **labels)
        if predicate(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{sample}{labels} = {value} did not reach the expected value in {timeout_s} s")
        time.sleep(0.02)
