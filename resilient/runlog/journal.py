"""The run journal: an append-only record of every transition, fault, decision, restore and
checkpoint.

Contract: on a local run directory `Journal.append(type, **fields)` makes the record durable before
it returns (append + fsync). Object stores cannot append: a writer thread rewrites the whole file in
one atomic PUT whenever records are new, and keeps retrying while the store is down, so appending
never blocks the supervisor; `flush(timeout)` waits until everything is out. `read_records(rundir)`
returns the records in order; a torn last line (a crash mid-append) is ignored. The journal is the
source of truth for `resilient status` and for resuming a run.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from resilient.rundir import RunDir
from resilient.rundir.layout import JOURNAL


def read_records(rundir: RunDir) -> list[dict]:
    try:
        raw = rundir.read_bytes(JOURNAL).decode()
    except FileNotFoundError:
        return []
    out = []
    for line in raw.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Journal:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._lines: list[str] = [json.dumps(r, sort_keys=True) for r in read_records(rundir)]
        self._written = len(self._lines)
        self._cond = threading.Condition()
        if not rundir.is_local:
            # Object stores cannot append and may be down for a while: a writer thread rewrites the
            # file whenever there is something new, so the supervisor never waits on storage.
            threading.Thread(target=self._writer, daemon=True, name="journal-writer").start()

    def append(self, type: str, **fields: Any) -> dict:
        rec = {"t": time.time(), "type": type, **fields}
        line = json.dumps(rec, sort_keys=True, default=str)
        with self._cond:
            self._lines.append(line)
            if not self.rundir.is_local:
                self._cond.notify_all()
                return rec
        path = self.rundir.local_path(JOURNAL)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        with self._cond:
            self._written = len(self._lines)
        return rec

    def _writer(self) -> None:
        while True:
            with self._cond:
                while self._written == len(self._lines):
                    self._cond.wait()
                lines = list(self._lines)
            try:
                self.rundir.write_bytes(JOURNAL, ("\n".join(lines) + "\n").encode())
            except Exception:  # storage outage: the records wait in memory; try again shortly
                time.sleep(1.0)
                continue
            with self._cond:
                self._written = len(lines)
                self._cond.notify_all()

    def flush(self, timeout: float = 0.0) -> bool:
        """Wait up to `timeout` until every record is in storage; True once it is."""
        deadline = time.time() + timeout
        with self._cond:
            while self._written < len(self._lines):
                left = deadline - time.time()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 1.0))
        return True
