"""A run directory read again and again for the dashboard, each byte once.

Contract: `RunReader(rundir)` is shared by every request of one dashboard: `records()` is the
journal so far (`runlog.JournalReader`: a local journal from where the last read stopped, an object
store's segments cached), `rows(name)` a Parquet dataset's rows so far (its immutable segments
cached, so a refresh reads only what is new), `log_lines(rank)` a rank's log (its newest
lines), `table(name)` the same as one pyarrow Table (columns,
not a dict per row: a long run's curves are computed without a Python object per step). Several
runs (`resilient dashboard RUN_DIR RUN_DIR`) have a reader each. Thread-safe (requests are served
from a thread pool).
"""

from __future__ import annotations

import threading
from collections import deque

import pyarrow as pa

from resilient.anomaly.store import decode_rows, decode_table
from resilient.rundir import RunDir
from resilient.rundir.tiers import SegmentCache
from resilient.runlog.journal import JournalReader
from resilient.runlog.ranklogs import LogReader

LOG_KEPT = 20_000  # lines per rank kept for the faults' excerpts (the newest)


class RunReader:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._journal = JournalReader(rundir)
        self._tables: dict[str, SegmentCache] = {}
        self._columns: dict[str, SegmentCache] = {}
        self._logs: dict[int, tuple[LogReader, deque[str]]] = {}
        self._lock = threading.Lock()

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
        return pa.concat_tables(parts, promote_options="default")

    def log_lines(self, rank: int) -> list[str]:
        """Rank `rank`'s log so far (its newest LOG_KEPT lines)."""
        with self._lock:
            if rank not in self._logs:
                self._logs[rank] = (LogReader(self.rundir, rank), deque(maxlen=LOG_KEPT))
            log, kept = self._logs[rank]
            kept.extend(log.new_lines())
            return list(kept)
