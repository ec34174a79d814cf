"""Heap settings of the server processes: fewer malloc arenas, freed memory handed back, and a
garbage collector that runs less often.

Under sustained load the RSS of the server crept up by about 1 MiB every 15 s while its live
Python memory did not grow (tracemalloc): requests allocate on the event loop's thread and free
on the compute thread and back, and freed chunks stay scattered through glibc's arenas
(`docs/benchmarks.md`). The malloc functions are no-ops off glibc.
"""

from __future__ import annotations

import asyncio
import atexit
import gc

from models.libc import libc
from service.settings import Settings

M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for threads created from now on (``mallopt(M_ARENA_MAX)``).

    glibc's default is 8 arenas per core; fewer arenas leave fewer places for freed chunks to
    scatter. Returns whether the cap was set (False off glibc, or with ``arenas=0``).
    """
    c = libc()
    return arenas > 0 and c is not None and bool(c.mallopt(M_ARENA_MAX, arenas))


async def trim_malloc_every(seconds: float) -> None:
    """Hand freed heap memory back to the OS every ``seconds`` (glibc ``malloc_trim(0)``, about a millisecond)."""
    c = libc()
    if c is None or seconds <= 0:
        return
    while True:
        await asyncio.sleep(seconds)
        c.malloc_trim(0)


def freeze_heap() -> None:
    """Collect, then move every object alive now out of the garbage collector's reach (``gc.freeze``).

    A server's long-lived objects (FastAPI's routes and models, pydantic schemas, torch modules)
    are what a full collection walks: 80–90 ms on the 2-core machine, a pause every request in
    flight waits out (it was most of the p99 at 16 concurrent clients). Called once the app is
    built and after every model load; objects made later are collected as usual.

    At exit the frozen objects are handed back to the collector (``gc.unfreeze``), so the
    interpreter's final collection frees them: extension modules that count their objects at
    shutdown (Triton's nanobind bindings, which torch imports whenever Triton is installed) would
    otherwise report each one as leaked.
    """
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # registered once, however often the heap is frozen
    atexit.register(gc.unfreeze)


def collect_young_after(allocations: int) -> None:
    """Collect the youngest generation after ``allocations`` net allocations of container objects
    (CPython's default: 700); 0 keeps the default.

    A front-end at 64 clients holds thousands of live objects for the requests in flight, so the
    default ran a collection every few requests that walked them all and promoted them: ~10% of
    the front-end's CPU (2.1 s of collections in a 30 s run at ~1,500 requests/s). Request objects
    are freed by reference counting; only cyclic garbage needs the collector, and a collection
    still runs once that many objects accumulate, which bounds it (``docs/benchmarks.md``).
    """
    if allocations > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(allocations, older, oldest)


def apply_heap_settings(settings: Settings) -> bool:
    """A server process's heap settings, at its start: the malloc arena cap
    (:func:`limit_malloc_arenas`) and the collector's threshold (:func:`collect_young_after`).
    Returns whether the arena cap was set."""
    capped = limit_malloc_arenas(settings.malloc_arenas)
    collect_young_after(settings.gc_threshold)
    return capped
