"""How much memory a training step takes, and how much there is: to size micro-batches so a run fits.

On the CPU the step's peak is read from the kernel (``VmHWM``, reset through
``/proc/self/clear_refs``); the memory there is ``MemAvailable`` capped by the container's cgroup
limit. On CUDA both come from the caching allocator and ``torch.cuda.mem_get_info``. Bytes throughout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ..libc import libc

GB = 1 << 30
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 1 << 20


def return_large_blocks_to_the_os() -> bool:
    """Serve every allocation of 1 MiB or more from its own mapping (``mallopt(M_MMAP_THRESHOLD)``).

    glibc raises that threshold each time a large block is freed, after which activations come from
    the heap and stay resident once freed: a CPU training run's RSS then grows well past what its
    step holds (measured: 10 GB for a step of 7.5). With a fixed threshold, freed activations go
    back at once and the RSS follows the step, at the price of page faults (a small Flow++ step on
    28×28 images: 4.1 → 5.2 s on 2 cores), so training sets it only where memory limits the step.
    Returns whether it was set (False off glibc).
    """
    c = libc()
    return c is not None and bool(c.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device: torch.device) -> int | None:
    """Memory a training step may still take on ``device`` (``None`` where it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(v for v in Path("/proc/meminfo").read_text().splitlines() if v.startswith("MemAvailable:"))
        avail = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail if avail is not None else 1 << 62, int(limit) - used)
    return avail


def in_use_bytes(device: torch.device) -> int | None:
    """Memory this process holds now: resident memory on the CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return _status_bytes("VmRSS")


@contextlib.contextmanager
def peak_growth(device: torch.device) -> Iterator[Callable[[], int | None]]:
    """Within the block, measure how far memory use rose above where it started (the returned
    function gives it in bytes after the block; ``None`` where it cannot be measured)."""
    result: list[int | None] = [None]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: result[0]
        torch.cuda.synchronize(device)
        result[0] = torch.cuda.max_memory_allocated(device) - start
        return
    start = _status_bytes("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        start = None
    yield lambda: result[0]
    peak = _status_bytes("VmHWM")
    result[0] = None if start is None or peak is None else max(0, peak - start)
