"""service.heap: the garbage collector's youngest-generation threshold."""

from __future__ import annotations

import gc

from service.heap import apply_heap_settings, collect_young_after
from service.settings import Settings


def test_collect_young_after_sets_only_the_youngest_threshold(monkeypatch) -> None:  # noqa: ANN001
    before = gc.get_threshold()
    try:
        collect_young_after(0)
        assert gc.get_threshold() == before  # 0 keeps what the interpreter has
        collect_young_after(12345)
        assert gc.get_threshold() == (12345, *before[1:])
        apply_heap_settings(Settings(gc_threshold=4321, malloc_arenas=0))  # what every server process runs at start
        assert gc.get_threshold() == (4321, *before[1:])
    finally:
        gc.set_threshold(*before)
    monkeypatch.setenv("FLOWSERVE_GC_THRESHOLD", "0")
    assert Settings().gc_threshold == 0
    monkeypatch.delenv("FLOWSERVE_GC_THRESHOLD")
    assert Settings().gc_threshold == 20000
