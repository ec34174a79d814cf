"""What the supervisor tells its child processes, what every child does first, and the port they share.

The supervisor (:mod:`service.server`) starts one model-executor process per device
(:mod:`service.executor`) and ``http_workers`` HTTP front-end processes (:mod:`service.frontend`),
each a fresh interpreter (``python -m ...``) that reads its :class:`ChildSpec` from the
environment variable ``FLOWSERVE_CHILD`` (the supervisor's resolved settings included, so a child
never re-reads ``FLOWSERVE_*`` and all agree).
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from service.settings import Settings

CHILD_ENV = "FLOWSERVE_CHILD"
PR_SET_PDEATHSIG = 1
EXIT_DEVICE_FAULT = 70  # an executor whose device is unusable exits with this; the supervisor restarts it


class ChildSpec(BaseModel):
    """One child process: its role, its place, and the whole service's settings."""

    role: Literal["executor", "frontend"]
    index: int
    incarnation: int = 0  # 0 for the first start, +1 per restart
    run_dir: str  # ipc sockets
    shm_dir: str  # shared-memory arenas
    devices: list[str]  # one executor per device, in order
    port: int
    parent: int
    settings: Settings

    def executor_address(self, index: int) -> str:
        """The Unix socket executor ``index`` listens on."""
        return str(Path(self.run_dir) / f"executor-{index}.sock")


def read_child_spec() -> ChildSpec:
    return ChildSpec.model_validate_json(os.environ[CHILD_ENV])


def die_with_parent(parent: int) -> None:
    """Be killed when the supervisor dies (Linux ``PR_SET_PDEATHSIG``), so no child outlives it."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except OSError:  # pragma: no cover - no glibc
            pass
    if os.getppid() != parent:  # the supervisor died before the prctl took effect
        os._exit(1)


def child_logging(role: str, index: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {role}-{index} %(name)s: %(message)s")


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (container limits)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_http_workers(executors: int, cores: int | None = None) -> int:
    """Front-ends when ``FLOWSERVE_HTTP_WORKERS`` is unset: the cores left after one per executor.

    An executor needs about a core of its own (its event loop and the thread that launches
    kernels); every other core can parse, validate and encode HTTP. At least one front-end;
    at most 32 (beyond that, more replicas scale better than more processes per pod).
    """
    cores = available_cores() if cores is None else cores
    return max(1, min(32, cores - executors))


def reuse_port_socket(host: str, port: int, backlog: int | None) -> socket.socket:
    """A socket on ``host:port`` shared (``SO_REUSEPORT``) by the supervisor, which only binds it to
    hold the port, and every front-end: listening, or with ``backlog=None`` only bound (a front-end's
    event loop listens when it starts serving, and until then the kernel gives new connections to
    the front-ends that listen)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP (accepted
    # connections inherit it), and without it Nagle holds the body behind the headers for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if backlog is not None:
        sock.listen(backlog)
    sock.set_inheritable(False)
    return sock
