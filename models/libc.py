"""glibc, for the heap settings of training runs (:mod:`models.training.memory`) and server processes
(:mod:`service.heap`). Imports nothing heavy: HTTP front-ends use it and must start without torch."""

from __future__ import annotations

import ctypes
import sys


def libc() -> ctypes.CDLL | None:
    """glibc, for ``mallopt`` and ``malloc_trim`` (``None`` elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None
