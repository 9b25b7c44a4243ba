"""A run directory read again and again for the dashboard, each byte once.

Contract: `RunReader(rundir)` is shared by every request of one dashboard: `records()` is the
journal so far (`runlog.JournalReader`: a local journal from where the last read stopped, an object
store's segments cached), `rows(name)` a Parquet dataset's rows so far (its immutable segments
cached, so a refresh reads only what is new). Thread-safe (requests are served from a thread pool).
"""

from __future__ import annotations

import threading

from resilient.anomaly.store import decode_rows
from resilient.rundir import RunDir
from resilient.rundir.tiers import SegmentCache
from resilient.runlog.journal import JournalReader


class RunReader:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._journal = JournalReader(rundir)
        self._tables: dict[str, SegmentCache] = {}
        self._lock = threading.Lock()

    def records(self) -> list[dict]:
        with self._lock:
            return self._journal.read()

    def rows(self, name: str) -> list[dict]:
        with self._lock:
            if name not in self._tables:
                self._tables[name] = SegmentCache(self.rundir, name, decode_rows)
            return self._tables[name].entries()
