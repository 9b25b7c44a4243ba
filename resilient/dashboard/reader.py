"""A run directory read again and again for the dashboard, each byte once.

Contract: `RunReader(rundir)` is shared by every request of one dashboard: `records()` is the
journal so far (`runlog.JournalReader`: a local journal from where the last read stopped, an object
store's segments cached), `rows(name)` a Parquet dataset's rows so far (its immutable segments
cached, so a refresh reads only what is new), `log_lines(rank)` a rank's log (its newest
lines), `table(name)` the same as one pyarrow Table (columns,
not a dict per row: a long run's curves are computed without a Python object per step; one chunk,
grown by what is new), `derived(name, fn)` what a view computes from the journal, kept until the
journal grows (and, for a costly view, a little longer). Several
runs (`resilient dashboard RUN_DIR RUN_DIR`) have a reader each. Thread-safe (requests are served
from a thread pool).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from resilient.anomaly.store import decode_rows, decode_table
from resilient.rundir import RunDir
from resilient.rundir.tiers import SegmentCache
from resilient.runlog.journal import JournalReader
from resilient.runlog.ranklogs import LogReader

LOG_KEPT = 20_000  # lines per rank kept for the faults' excerpts (the newest)
CHUNKS_KEPT = 64  # a table's chunks before they are combined (a copy of it: not at every poll)
STALE_FACTOR = 5.0  # a view is recomputed at most every 5x what it costs: <= 20% of a core


class RunReader:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._journal = JournalReader(rundir)
        self._tables: dict[str, SegmentCache] = {}
        self._columns: dict[str, SegmentCache] = {}
        self._logs: dict[int, tuple[LogReader, deque[str]]] = {}
        self._combined: dict[str, tuple[int, pa.Table]] = {}
        self._derived: dict[str, tuple[tuple, Any, float, float]] = {}  # key, value, at, took
        self._lengths: dict[str, int] = {}  # the journal's length at each view's last ask
        self._lock = threading.Lock()
        self._derive_lock = threading.Lock()

    def records(self) -> list[dict]:
        with self._lock:
            return self._journal.read()

    def rows(self, name: str) -> list[dict]:
        with self._lock:
            if name not in self._tables:
                self._tables[name] = SegmentCache(self.rundir, name, decode_rows)
            return self._tables[name].entries()

    def table(self, name: str, schema: pa.Schema) -> pa.Table:
        """Every row of the dataset `name` so far (an empty table of `schema` when none)."""
        with self._lock:
            if name not in self._columns:
                self._columns[name] = SegmentCache(self.rundir, name, decode_table)
            parts = self._columns[name].entries()
            if not parts:
                return schema.empty_table()
            n, done = self._combined.get(name, (0, None))
            if done is None or n > len(parts) or sum(p.num_rows for p in parts[:n]) != len(done):
                n, done = 0, None  # segments merged into one read anew: build it again
            if n < len(parts):
                new = parts[n:] if done is None else [done, *parts[n:]]
                done = pa.concat_tables(new, promote_options="default")
                if done.column(0).num_chunks > CHUNKS_KEPT:  # a chunk per segment is slow to walk
                    done = done.combine_chunks()
                self._combined[name] = (len(parts), done)
            return done

    def derived(self, name: str, fn: Callable[[list[dict]], Any], *key) -> Any:
        """`fn(records)`, computed again only when the journal (or `key`) changed since, and not
        sooner than STALE_FACTOR times what the last computation took: every poll of every open
        page asks; a finished run's answer is computed once, and a view of a weeks-long journal
        that takes a second is at most a few seconds old instead of taking the server's whole
        time; once the journal stops growing (a finished run) the next ask is exact. Callers must
        not change what it returns."""
        with self._derive_lock:
            recs = self.records()
            k = (len(recs), *key)
            hit = self._derived.get(name)
            now = time.monotonic()
            quiet = self._lengths.get(name) == len(recs)  # nothing new since the last ask
            self._lengths[name] = len(recs)
            if hit is None or (hit[0] != k and (quiet or now - hit[2] >= STALE_FACTOR * hit[3])):
                value = fn(recs)
                hit = (k, value, now, time.monotonic() - now)
                self._derived[name] = hit
            return hit[1]

    def log_lines(self, rank: int) -> list[str]:
        """Rank `rank`'s log so far (its newest LOG_KEPT lines)."""
        with self._lock:
            if rank not in self._logs:
                self._logs[rank] = (LogReader(self.rundir, rank), deque(maxlen=LOG_KEPT))
            log, kept = self._logs[rank]
            kept.extend(log.new_lines())
            return list(kept)
