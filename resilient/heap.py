"""Heap: a long-lived process's freed memory handed back to the system.

Contract: `limit_arenas()` caps glibc's malloc arenas (once, early: before threads start) and
`Trimmer(every_s).maybe()` returns freed heap pages to the kernel (`malloc_trim(0)`) at most once
per `every_s`. Both do nothing where the C library is not glibc. Neither frees anything in use.

Why: over a soak, tracemalloc saw the driver's Python objects stay flat while its RSS grew; glibc
kept the freed memory (8.4 MiB held against 2.5 MiB in use over the same minutes; one
`malloc_trim` at the end gave back 11 MiB). Each thread that allocates may get an arena of its
own (up to 8 per core), and Ray's, gloo's and our own threads allocate in bursts: a few arenas
and a periodic trim keep the RSS at what is in use.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time

ARENAS = 2  # malloc arenas per process (glibc's default: 8 per core)
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): nothing to do
        return None


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> None:
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)


def trim() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class Trimmer:
    def __init__(self, every_s: float = 60.0, clock=time.monotonic):
        self.every_s, self.clock = every_s, clock
        self._last = clock()

    def maybe(self) -> bool:
        """Trim if `every_s` passed since the last; whether it did."""
        now = self.clock()
        if now - self._last < self.every_s:
            return False
        self._last = now
        trim()
        return True
