"""The run journal: an append-only record of every transition, fault, decision, restore and checkpoint.

Contract: `Journal.append(type, **fields)` makes the record durable before it returns (local: append
+ fsync; object stores, which cannot append: the whole file is rewritten in one atomic PUT).
While an object store is down, records wait in memory and go out with the next append or `flush()`.
`read_records(rundir)` returns the records in order; a torn last line (a crash mid-append) is ignored.
The journal is the source of truth for `resilient status` and for resuming a run.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from resilient.rundir import RunDir

JOURNAL = "journal.jsonl"


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
        self.unflushed = False

    def append(self, type: str, **fields: Any) -> dict:
        rec = {"t": time.time(), "type": type, **fields}
        line = json.dumps(rec, sort_keys=True, default=str)
        self._lines.append(line)
        if self.rundir.is_local:
            path = self.rundir.local_path(JOURNAL)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        else:
            self.flush()
        return rec

    def flush(self) -> bool:
        """Remote journals: write everything out; False (and retried on the next append) while storage is down."""
        if self.rundir.is_local:
            return True
        try:
            self.rundir.write_bytes(JOURNAL, ("\n".join(self._lines) + "\n").encode())
            self.unflushed = False
        except Exception:  # storage outage: the records wait in memory, training goes on
            self.unflushed = True
        return not self.unflushed
