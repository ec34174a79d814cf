"""ONNX Runtime sessions whose optimised graphs are kept on disk, so a restart skips graph optimisation.

Creating a session optimises the graph first (``ORT_ENABLE_ALL``: constant folding, fusions, the
NCHWc convolution layout). For the bundled Flow++ that is most of the model's load time: its
sampling graph (the mixture CDF inverse unrolled) takes 9.6 s to open on 2 cores, 2.3 s when the
graph optimised then is loaded with optimisations off (``docs/benchmarks.md``). So the first
session of a graph also writes its optimised form (ONNX Runtime's ``optimized_model_filepath``,
its documented offline mode) to ``FLOWSERVE_ORT_CACHE_DIR``, and later sessions (an executor
restarted after a crash, a reload, the next ``make serve``) load that.

ONNX Runtime warns that an ``ORT_ENABLE_ALL`` graph may hold optimisations for the CPU it was made
on, so an entry is named by everything it depends on: the source graph's sha256 (from the
manifest), the ONNX Runtime version, the machine and its CPU flags. Only CPU sessions are cached:
a graph optimised for the CPU provider would pin fused CPU kernels onto a CUDA session. An
entry that cannot be read is rebuilt; a directory that cannot be written only costs the time.
The directory is kept under :data:`CACHE_BYTES`: the least recently used entries go first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_BYTES = 4 << 30


@functools.cache
def cpu_identity() -> str:
    """Short hash of the CPU model and its flags (Linux ``/proc/cpuinfo``; the machine type is in the entry's name)."""
    lines: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key = line.partition(":")[0].strip()
            if key in ("model name", "flags", "Features", "CPU part") and line not in lines:
                lines.append(line)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]


def cache_entry(cache_dir: Path, digest: str) -> Path:
    """Where the optimised form of the graph with sha256 ``digest`` lives on this machine and ONNX Runtime."""
    import onnxruntime as ort

    return cache_dir / f"{digest[:32]}-ort{ort.__version__}-{platform.machine()}-{cpu_identity()}.onnx"


def open_session(graph: Path, digest: str | None, options, providers: list, cache_dir: Path | None):  # noqa: ANN001, ANN201
    """An ``onnxruntime.InferenceSession`` for ``graph`` (sha256 ``digest``, from the manifest) with ``options``.

    CPU-only sessions of a graph with a known digest and a ``cache_dir`` load the cached optimised graph with optimisations off,
    or optimise ``graph`` and write the cache entry (atomically: written beside it, then renamed).
    ``options`` is left as it was given.
    """
    import onnxruntime as ort

    level = options.graph_optimization_level
    if cache_dir is None or digest is None or providers != ["CPUExecutionProvider"] or level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        return ort.InferenceSession(str(graph), options, providers=providers)
    entry = cache_entry(cache_dir, digest)
    if entry.is_file():
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            session = ort.InferenceSession(str(entry), options, providers=providers)
            with contextlib.suppress(OSError):
                os.utime(entry)  # recently used: pruned last
            return session
        except Exception as e:  # noqa: BLE001 - an unreadable entry is rebuilt
            log.warning("cached optimised graph %s cannot be loaded (%s); optimising %s again", entry, e, graph)
            with contextlib.suppress(OSError):
                entry.unlink()
        finally:
            options.graph_optimization_level = level
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache_dir, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        log.warning("cannot write to FLOWSERVE_ORT_CACHE_DIR=%s; optimised ONNX graphs are not cached", cache_dir)
        return ort.InferenceSession(str(graph), options, providers=providers)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    severity = options.log_severity_level
    options.optimized_model_filepath, options.log_severity_level = str(tmp), 3  # ORT's warning is why entries are keyed
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
        os.replace(tmp, entry)
    except Exception as e:  # noqa: BLE001 - e.g. a full disk; a graph that cannot load fails again below, with its own error
        log.warning("cannot cache the optimised graph of %s in %s (%s)", graph, cache_dir, str(e).splitlines()[0] if str(e) else e)
        session = None
    finally:
        options.optimized_model_filepath, options.log_severity_level = "", severity
        with contextlib.suppress(OSError):
            tmp.unlink()
    if session is None:
        return ort.InferenceSession(str(graph), options, providers=providers)
    log.info("optimised ONNX graph of %s cached as %s", graph, entry)
    prune(cache_dir, keep=entry)
    return session


def prune(cache_dir: Path, keep: Path, limit: int = CACHE_BYTES) -> None:
    """Delete the least recently used entries (by mtime) until ``cache_dir`` holds at most ``limit`` bytes; never ``keep``."""
    entries = []
    for f in cache_dir.glob("*.onnx"):
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        if f != keep:
            with contextlib.suppress(OSError):
                f.unlink()
                total -= size
