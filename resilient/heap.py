"""Heap: a long-lived process's freed memory handed back to the system.

Contract: `limit_arenas()` caps glibc's malloc arenas and puts pyarrow on malloc (once, early:
before threads start and before pyarrow is imported), `arrow_on_malloc()` does the latter later
where it can (a process that writes Parquet); `Trimmer(every_s).maybe()` returns freed heap pages
to the kernel (`malloc_trim(0)`) at most once per `every_s`. They do nothing where the C library
is not glibc. None frees anything in use.

Why: over a soak, tracemalloc saw the driver's Python objects stay flat while its RSS grew; glibc
kept the freed memory (8.4 MiB held against 2.5 MiB in use over the same minutes; one
`malloc_trim` at the end gave back 11 MiB). Each thread that allocates may get an arena of its
own (up to 8 per core), and Ray's, gloo's and our own threads allocate in bursts: a few arenas
and a periodic trim keep the RSS at what is in use. pyarrow allocates from mimalloc, which keeps
what it freed: the metrics' hourly merge (an hour of step rows read, concatenated, written) raised
a process's RSS by 112 MiB for good (measured: 720 flushes of the driver's `ParquetLog`, 144 ->
256 MiB at the first level-2 merge); on malloc from the start, with the trim, it left 7 MiB
(switching pools after Arrow first allocated: 67 MiB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

ARENAS = 2  # malloc arenas per process (glibc's default: 8 per core)
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
ARROW_POOL = "ARROW_DEFAULT_MEMORY_POOL"  # read by Arrow once, when it first allocates


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:  # not glibc (musl, macOS): nothing to do
        return None


_LIBC = _glibc()


def limit_arenas(arenas: int = ARENAS) -> None:
    """Also has pyarrow allocate from malloc, in this process and those it starts (Ray's, on an
    embedded cluster), where pyarrow is not imported yet and the user chose no pool."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)
        os.environ.setdefault(ARROW_POOL, "system")


def arrow_on_malloc() -> None:
    """pyarrow's allocations from malloc from now on, where `limit_arenas` came too late (pyarrow
    imported before; Arrow's Parquet code then still draws partly from its first pool)."""
    if _LIBC is not None and ARROW_POOL not in os.environ:
        import pyarrow

        if pyarrow.default_memory_pool().backend_name != "system":
            pyarrow.set_memory_pool(pyarrow.system_memory_pool())


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
