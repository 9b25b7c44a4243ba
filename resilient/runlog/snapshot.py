"""Status snapshots: the fold of a journal's first n records, kept beside it, so `status` on a
two-week run reads one small object and the journal's tail, not the whole journal.

Contract: `Folder(status, count, offset, last, written)` holds the status folded over the
journal's first `count` records (and, for a local journal, the bytes they take, `offset`, and the
last one's line as (length, CRC-32), `last`); `add(rec, line, offset)` folds one more (O(1) in the
run's length); `due()` says the newest snapshot (`written`) is `EVERY` records behind;
`write(rundir)` stores `status.json` = {"fold", "records", "offset", "last", "status"} with one
atomic put (O(status), never O(journal)); `fold` names the fold's version (a snapshot another
version made is not used). The journal writes one only after the records it covers are stored (a
local journal's fsynced, an object store's segment uploaded), so a snapshot never claims a record
storage lacks. `read_status(rundir)` is `fold` of every record: the newest snapshot plus the
records after it; a missing or unreadable snapshot, or one the journal does not match (cut back or
edited by hand: a local journal's line that ends at `offset` must have the length and CRC-32 the
snapshot names in `last`; an object store's segments must reach its count) means the whole
journal is folded (slower, never wrong). Damage in the records a snapshot covers is not seen by
`read_status` (it does not read them); the journal's open and a whole read still report it.
`opened(rundir)` is the `Folder` a journal that opens on existing records goes on from.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import zlib
from dataclasses import dataclass

from resilient.rundir import RunDir
from resilient.rundir.layout import JOURNAL, JOURNAL_DIR, STATUS
from resilient.rundir.tiers import SegmentGap, covering
from resilient.runlog import status as status_module
from resilient.runlog.status import fold

EVERY = 10_000  # records between snapshots: the most `status` folds beyond one
# the fold a snapshot was made with: another version's (a new key, a changed meaning) is not used
FOLD = hashlib.sha256(inspect.getsource(status_module).encode()).hexdigest()[:16]

log = logging.getLogger(__name__)


@dataclass
class Folder:
    status: dict
    count: int = 0  # records folded
    offset: int | None = None  # a local journal's bytes holding them
    last: tuple[int, int] | None = None  # a local journal's last folded line: (length, CRC-32)
    written: int = 0  # the count of the newest snapshot stored

    def add(self, rec: dict, line: bytes | None = None, offset: int | None = None) -> None:
        """Fold one more record (`line`, `offset`: its bytes with the newline, and the local
        journal's length after it)."""
        fold([rec], self.status)
        self.count += 1
        self.offset = offset
        self.last = (len(line), zlib.crc32(line)) if line is not None else None

    def due(self) -> bool:
        return self.count - self.written >= EVERY

    def write(self, rundir: RunDir) -> None:
        """Store the snapshot (raises on a storage error: the next due write tries again)."""
        snap = {"fold": FOLD, "records": self.count, "offset": self.offset, "last": self.last}
        snap["status"] = self.status  # its keys in the order a fold makes them (status --json)
        rundir.write_bytes(STATUS, json.dumps(snap, default=str).encode())
        self.written = self.count


def _last(lines: list[bytes]) -> tuple[int, int] | None:
    """(length, CRC-32) of the last of a local journal's `lines`, with its newline."""
    return (len(lines[-1]) + 1, zlib.crc32(lines[-1] + b"\n")) if lines else None


def _snapshot(rundir: RunDir) -> dict | None:
    try:
        if not rundir.exists(STATUS):
            return None
        snap = json.loads(rundir.read_bytes(STATUS))
    except (OSError, ValueError) as e:  # unreadable: the whole journal still says it all
        log.warning("%s: %s; folding the whole journal", rundir.url(STATUS), e)
        return None
    ok = (
        isinstance(snap, dict)
        and snap.get("fold") == FOLD
        and isinstance(snap.get("status"), dict)
        and isinstance(snap.get("records"), int)
        and (snap.get("last") is None or _pair(snap["last"]))
    )
    return snap if ok else None


def _pair(x) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(isinstance(v, int) for v in x)


def _local_tail(rundir: RunDir, snap: dict) -> tuple[list[dict], list[bytes], int] | None:
    """The records after the snapshot's offset, their lines and the offset after them; None where
    the journal does not match the snapshot."""
    from resilient.runlog.journal import _parse

    offset, last = snap.get("offset"), snap.get("last")
    if not isinstance(offset, int) or not last:
        return None
    path = rundir.local_path(JOURNAL)
    try:
        with open(path, "rb") as f:
            f.seek(offset - last[0])
            line = f.read(last[0])
            rest = f.read()
    except (FileNotFoundError, ValueError, OSError):
        return None
    if len(line) != last[0] or zlib.crc32(line) != last[1] or not line.endswith(b"\n"):
        return None
    whole = rest.rfind(b"\n") + 1
    lines = rest[:whole].split(b"\n")[:-1]
    records = _parse(lines, path, snap["records"] + 1)  # damage is an error, as in a whole read
    return records, lines, offset + whole


def read_status(rundir: RunDir) -> dict:
    """The run's status: `fold` of every record, read from the newest snapshot on."""
    return _from_snapshot(rundir)[0].status


def opened(rundir: RunDir) -> Folder:
    """Where a journal opening on this run's records goes on folding."""
    return _from_snapshot(rundir)[0]


def _from_snapshot(rundir: RunDir) -> tuple[Folder, bool]:
    """The folder over every record so far, and whether a snapshot served."""
    from resilient.runlog.journal import _local_lines, _parse, read_records, segmented

    local = not segmented(rundir)
    snap = _snapshot(rundir)
    if snap is not None:
        n = snap["records"]
        if local:
            tail = _local_tail(rundir, snap)
            if tail is not None:
                records, lines, offset = tail
                status = fold(records, _start(snap))
                last = _last(lines) or tuple(snap["last"])
                return Folder(status, n + len(records), offset, last, n), True
        else:
            try:
                segs = covering(rundir.listdir(JOURNAL_DIR))
            except SegmentGap:  # the whole read says what is missing
                segs = []
            if segs and segs[-1].last + 1 >= n:
                status, count = _start(snap), n
                for s in (s for s in segs if s.last >= n):
                    where = rundir.url(f"{JOURNAL_DIR}/{s.name}")
                    recs = _parse(rundir.read_bytes(f"{JOURNAL_DIR}/{s.name}").split(b"\n"), where)
                    fresh = recs[max(0, n - s.first) :]
                    status = fold(fresh, status)
                    count += len(fresh)
                return Folder(status, count, None, None, n), True
        log.info("%s does not match the journal; folding the whole journal", rundir.url(STATUS))
    if not local:
        records = read_records(rundir)
        return Folder(fold(records), len(records)), False
    path = rundir.local_path(JOURNAL)
    lines, _torn = _local_lines(path)  # read once: the records, their length and the last line
    records = _parse(lines, path)
    offset = sum(len(x) + 1 for x in lines)
    return Folder(fold(records), len(records), offset, _last(lines)), False


def _start(snap: dict) -> dict:
    """A snapshot's status, with the keys a newer version folds (absent from an older one's)."""
    return fold([]) | snap["status"]
