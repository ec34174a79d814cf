"""Device workers: one per device, each a single thread that runs model compute off the event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")


def resolve_devices(devices: list[str]) -> list[str]:
    """``["auto"]`` → every CUDA device, or ``["cpu"]`` when there is none."""
    if devices == ["auto"] or not devices:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    for d in devices:
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"FLOWSERVE_DEVICES names {d} but CUDA is not available")
    return devices


class DeviceWorker:
    """Runs callables on one device, one at a time, in its own thread, or ``inline`` on the caller's.

    Inline suits an executor process (:mod:`service.executor`), where nothing else needs the event
    loop while a batch computes (messages wait in the socket buffers and join the next batch), and a
    second thread would contend for the GIL with the loop's socket I/O and add a thread hop to every
    batch.
    """

    def __init__(self, device: str, inline: bool = False) -> None:
        self.device = device
        self.inline = inline
        self._executor = None if inline else ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flowserve-{device}")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._executor is None:
            return fn(*args)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def memory_allocated(self) -> int | None:
        """Bytes allocated on this worker's CUDA device, ``None`` on CPU (never touches the device lazily)."""
        if not self.device.startswith("cuda") or not torch.cuda.is_initialized():
            return None
        return int(torch.cuda.memory_allocated(torch.device(self.device)))

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
