"""Each rank's output, collected in the run directory: `logs/rank-N.log`.

Contract: `RankLogs(rundir)` takes lines (`append(rank, lines)`, from heartbeats; `rank` may also
be `layout.DRIVER_LOG`, the driver's captured output: `logs/driver.log`) and never blocks
on storage: a thread of its own writes what is new every FLUSH_S, and `close()` writes the rest.
On a local run directory each rank's lines are appended to `logs/rank-N.log`; on an object store
they are the segments of a tiered log under `logs/rank-N/` (one small PUT per flush per rank,
merged as the journal's are, so the cost stays linear in the run). `LogReader(rundir, rank)`
returns each line once, either way (`new_lines()`); `ranks(rundir)` the ranks that have a log.
Lines a failed write kept are retried at the next flush.
"""

from __future__ import annotations

import os
import re
import threading

from resilient.rundir import RunDir
from resilient.rundir.layout import DRIVER_LOG, LOGS, log_stem, rank_log
from resilient.rundir.tiers import SegmentCache, Tiers

FLUSH_S = 2.0
FANOUT = (16, 64)
BACKLOG = 20_000  # lines per rank kept while storage is down (the newest win; drops are counted)


class RankLogs:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._pending: dict[int | str, list[str]] = {}
        self.dropped = 0  # lines dropped while storage was down
        self._tiers: dict[int | str, Tiers] = {}
        self._lock = threading.Lock()
        self._io = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rank-logs")
        self._thread.start()

    def append(self, rank: int | str, lines: tuple[str, ...] | list[str]) -> None:
        if lines:
            with self._lock:
                self._pending.setdefault(rank, []).extend(lines)

    def _loop(self) -> None:
        while not self._closed.wait(FLUSH_S):
            self.flush()

    def flush(self) -> None:
        with self._io:
            with self._lock:
                batch, self._pending = self._pending, {}
            for rank, lines in batch.items():
                try:
                    self._write(rank, lines)
                except Exception:  # storage is down: keep the newest for the next flush
                    with self._lock:
                        kept = lines + self._pending.get(rank, [])
                        self.dropped += max(0, len(kept) - BACKLOG)
                        self._pending[rank] = kept[-BACKLOG:]

    def _write(self, rank: int | str, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        if self.rundir.is_local:
            path = self.rundir.local_path(rank_log(rank))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "ab") as f:
                f.write(data)
            return
        if rank not in self._tiers:
            self._tiers[rank] = Tiers(self.rundir, _prefix(rank), ".log", b"".join, FANOUT)
        self._tiers[rank].put(data, len(lines))

    def close(self) -> None:
        self._closed.set()
        self.flush()
        with self._io:
            for tiers in self._tiers.values():
                try:
                    tiers.seal()
                except Exception:  # the segments are whole already; sealing only tidies
                    pass


def _prefix(rank: int | str) -> str:
    return log_stem(rank)


def log_url(rundir: RunDir, rank: int) -> str:
    """Where rank `rank`'s log is (a fault's record names it; `resilient logs` reads it)."""
    return rundir.url(rank_log(rank) if rundir.is_local else _prefix(rank) + "/")


def has_driver_log(rundir: RunDir) -> bool:
    return rundir.exists(rank_log(DRIVER_LOG)) or rundir.exists(_prefix(DRIVER_LOG))


def ranks(rundir: RunDir) -> list[int]:
    found = set()
    for name in rundir.listdir(LOGS) if rundir.exists(LOGS) else []:
        m = re.match(r"^rank-(\d+)(\.log)?$", os.path.basename(name.rstrip("/")))
        if m:
            found.add(int(m[1]))
    return sorted(found)


class LogReader:
    """Reads one rank's log again and again (`resilient logs --follow`), each byte once."""

    def __init__(self, rundir: RunDir, rank: int | str):
        self.rundir, self.rank, self._offset = rundir, rank, 0
        self._count = 0
        self._cache = SegmentCache(rundir, _prefix(rank), _lines)

    def _segmented(self) -> bool:
        """An object store's layout: remote, or a local copy of one (segments, no .log file)."""
        if not self.rundir.is_local:
            return True
        here = self.rundir.exists
        return not here(rank_log(self.rank)) and here(_prefix(self.rank))

    def new_lines(self) -> list[str]:
        if not self._segmented():
            try:
                with open(self.rundir.local_path(rank_log(self.rank)), "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return []
            whole = data.rfind(b"\n") + 1
            self._offset += whole
            return data[:whole].decode("utf-8", "replace").splitlines()
        entries = self._cache.entries() if self.rundir.exists(_prefix(self.rank)) else []
        out, self._count = entries[self._count :], len(entries)
        return out


def _lines(_segment, data: bytes) -> list[str]:
    return data.decode("utf-8", "replace").splitlines()
