"""The run journal: an append-only record of every transition, fault, decision, restore and
checkpoint; the source of truth for `resilient status` and for resuming a run.

Contract: `Journal(rundir).append(type, **fields)` (or `extend` for several at once) never loses a
record it returned from, and never waits on remote storage:
- A local run directory keeps `journal.jsonl`: each append writes its line and fsyncs before it
  returns. Opening repairs a torn last line (a crash mid-append: the file is cut back to its last
  whole line, so the next append starts clean); a line in the middle that is not a record is an
  error (`JournalCorrupt`, naming the line), never skipped. A journal removed, replaced or cut
  behind this one's back (the run directory deleted or moved while the job runs) is an error
  (`JournalLost`) at the next append, never a new journal begun in its place: that would hold
  neither the job's record nor its history, and `--resume` could not continue it.
- An object store cannot append: records go to `journal/` as immutable segments (`rundir.tiers`:
  a writer thread uploads what is new as one segment at most every `FLUSH_S` or at `flush()`,
  and merges segments in tiers, so each byte is uploaded at most three times and the objects grow
  with the journal's size, not with its appends). A storage error keeps the records in memory and
  is retried; `error` says what failed, `durable` whether every record is stored. Segments deleted
  behind this journal's back (its first or newest is gone: the run directory removed) stop the
  writer, and the next append raises `JournalLost`, as a local journal's does.
`flush(timeout)` waits until every record is stored and says whether it is. `read_records(rundir)`
returns the records in order (a torn last line of a local journal is left out). Every
`snapshot.EVERY` stored records (and, for a local journal, at open when the newest snapshot is
that far behind) the journal stores the status folded so far (`runlog.snapshot`), so `status`
reads only the tail.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from resilient.errors import UserError
from resilient.rundir import RunDir
from resilient.rundir.layout import JOURNAL, JOURNAL_DIR
from resilient.rundir.tiers import Segment, SegmentCache, SegmentGap, SegmentsLost, Tiers
from resilient.runlog import snapshot

FLUSH_S = 1.0  # at most one upload a second: appends in between share it
FANOUT = (16, 64)  # 16 uploads make a level-1 segment, 64 of those a level-2 one (~17 min)


class JournalCorrupt(UserError):
    """The journal holds something that is not a record: says where, and what to do."""


class JournalLost(UserError):
    """The local journal this one appends to was removed, replaced or cut by someone else: says
    which, and what to do. The supervisor ends on it without a last record (there is nowhere to
    write one)."""


def _parse(lines: list[bytes], where: str, first_line: int = 1) -> list[dict]:
    out = []
    for n, line in enumerate(lines, first_line):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or "type" not in rec:
                raise ValueError("not a journal record")
        except ValueError as e:
            raise JournalCorrupt(
                f"{where}: line {n} is not a journal record ({e}); the run's history is damaged "
                "there: restore the file from a copy, or cut the line out to go on"
            ) from None
        out.append(rec)
    return out


def _local_lines(path: str) -> tuple[list[bytes], int]:
    """The whole lines of a local journal and the length of a torn tail after them."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return [], 0
    whole = raw.rfind(b"\n") + 1
    return raw[:whole].split(b"\n")[:-1], len(raw) - whole


class JournalReader:
    """Reads a run's journal again and again (status, dashboard), each byte once: a local journal
    from where the last read stopped (a torn last line waits until it is whole), an object store's
    segments through a `SegmentCache`."""

    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self._records: list[dict] = []
        self._offset = self._lines = 0
        self._segments = SegmentCache(rundir, JOURNAL_DIR, self._decode)

    def _decode(self, seg: Segment, data: bytes) -> list[dict]:
        return _parse(data.split(b"\n"), self.rundir.url(f"{JOURNAL_DIR}/{seg.name}"))

    def read(self) -> list[dict]:
        """Every record so far, in order; [] when there is no journal yet."""
        if segmented(self.rundir):
            try:
                return self._segments.entries()
            except SegmentGap as e:
                raise JournalCorrupt(f"{self.rundir.url(JOURNAL_DIR)}: {e}") from None
        path = self.rundir.local_path(JOURNAL)
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                new = f.read()
        except FileNotFoundError:
            return []
        whole = new.rfind(b"\n") + 1
        lines = new[:whole].split(b"\n")[:-1]
        self._records += _parse(lines, path, self._lines + 1)
        self._offset, self._lines = self._offset + whole, self._lines + len(lines)
        return list(self._records)


def read_records(rundir: RunDir) -> list[dict]:
    """Every record of the run's journal, in order; [] when it has none."""
    return JournalReader(rundir).read()


def segmented(rundir: RunDir) -> bool:
    """Whether the run's journal is segments (an object store's layout): a remote run directory,
    or a local copy of one (`aws s3 sync`), with journal/ and no journal.jsonl."""
    if not rundir.is_local:
        return True
    return not rundir.exists(JOURNAL) and bool(rundir.listdir(JOURNAL_DIR))


def journal_exists(rundir: RunDir) -> bool:
    if not segmented(rundir):
        return rundir.exists(JOURNAL)
    return bool(rundir.listdir(JOURNAL_DIR))


def _identity(path: str) -> tuple[int, int, int] | None:
    """A local journal's (device, inode, size); None when there is none yet."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size


def _opened(rundir: RunDir) -> snapshot.Folder | None:
    """The status folded over the records stored so far; None (no snapshots) where they do not
    fold. A storage error is raised (an object store's writer retries it)."""
    try:
        return snapshot.opened(rundir)
    except (OSError, JournalCorrupt):
        raise
    except Exception:
        logging.getLogger(__name__).exception("status snapshots off: the journal did not fold")
        return None


class Journal:
    def __init__(self, rundir: RunDir):
        self.rundir = rundir
        self.error: str | None = None
        # Called with every record appended, in the appending thread (the Prometheus exporter):
        # each must be cheap; one that raises is logged, never allowed to lose the record.
        self.listeners: list[Callable[[dict], None]] = []
        self._cond = threading.Condition()
        self._pending: list[str] = []  # appended, not yet stored (object stores)
        self._flush = False
        self._folder: snapshot.Folder | None = None  # the stored records, folded (None: off)
        self._opened = False  # an object store's folder is read by the writer's first upload
        self._file: tuple[int, int, int] | None = None  # a local journal's (dev, inode, size)
        self._lost: str | None = None  # why: an object store's segments deleted meanwhile
        if rundir.is_local:
            self._repair(rundir.local_path(JOURNAL))
            self._file = _identity(rundir.local_path(JOURNAL))
            self._folder = _opened(rundir)
            self._fold([])
        else:
            self._tiers = Tiers(rundir, JOURNAL_DIR, ".jsonl", b"".join, FANOUT, guard=True)
            threading.Thread(target=self._writer, daemon=True, name="journal-writer").start()

    @staticmethod
    def _repair(path: str) -> None:
        lines, torn = _local_lines(path)
        _parse(lines, path)  # a damaged middle is an error, before anything is appended
        if torn:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - torn)
                os.fsync(f.fileno())

    def append(self, type: str, **fields: Any) -> dict:
        return self.extend([(type, fields)])[0]

    def extend(self, items: list[tuple[str, dict[str, Any]]]) -> list[dict]:
        """Append several records (type, fields) as one write: a local journal fsyncs once for
        all of them (what one poll brings in: a persist's `persisted` and `retention`), so they
        are stored together or, after a crash mid-write, the whole ones among them are."""
        self._raise_if_lost()  # before a listener sees what will not be stored
        recs, lines = [], []
        for type, fields in items:
            rec = {"t": time.time(), "type": type, **fields}
            for listen in self.listeners:
                try:
                    listen(rec)
                except Exception:  # a metric is not worth a record: the journal goes on
                    logging.getLogger(__name__).exception("journal listener failed on %s", type)
            recs.append(rec)
            lines.append(json.dumps(rec, sort_keys=True, default=str))
        if not lines:
            return recs
        if not self.rundir.is_local:
            with self._cond:
                self._raise_if_lost()
                self._pending.extend(lines)
                self._cond.notify_all()
            return recs
        with self._cond:
            datas = [(line + "\n").encode() for line in lines]
            end = self._write_local(b"".join(datas))
            offset = end - sum(map(len, datas))
            for line, data in zip(lines, datas, strict=True):
                offset += len(data)
                self._fold([line], data, offset)
        return recs

    def _raise_if_lost(self) -> None:
        with self._cond:
            if self._lost:  # a new exception each time: one raised again keeps every traceback
                raise JournalLost(self._lost)

    def _write_local(self, data: bytes) -> int:
        """Append `data` to the local journal and fsync it; the file's size after it. Raises
        `JournalLost` when the file this journal wrote is gone, another, or shorter."""
        path = self.rundir.local_path(JOURNAL)
        flags = os.O_WRONLY | os.O_APPEND
        if self._file is None:  # nothing written yet: the first append makes the file
            os.makedirs(os.path.dirname(path), exist_ok=True)
            flags |= os.O_CREAT
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:
            raise JournalLost(self._lost_message(path, "removed")) from None
        try:
            st = os.fstat(fd)
            if self._file is not None:
                dev, ino, size = self._file
                if (st.st_dev, st.st_ino) != (dev, ino):
                    raise JournalLost(self._lost_message(path, "replaced by another file"))
                if st.st_size < size:
                    raise JournalLost(
                        self._lost_message(path, f"cut from {size} to {st.st_size} bytes")
                    )
            view = memoryview(data)
            while view:  # a regular file takes it whole; a short write (disk full) goes on
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            end = os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)
        self._file = (st.st_dev, st.st_ino, end)
        return end

    def _lost_message(self, path: str, how: str) -> str:
        return (
            f"the run's journal {path} was {how} while the job ran (by something else: this "
            "journal only appends); the job is stopped without writing another record, so "
            "that nothing starts a history in its place. Put the run directory back (from a "
            "copy, over what the job's ranks wrote there since) and `resilient launch --resume "
            f"{self.rundir.uri}`, or launch the job again as a new run"
        )

    def _fold(self, lines: list[str], data: bytes | None = None, offset: int | None = None) -> None:
        """Fold stored records into the status snapshot, and store one when due. Never raises: a
        record the fold cannot take ends the snapshots of this journal (status then folds the
        whole journal, as before them), never the record or the journal's writer."""
        if self._folder is None:
            return
        try:
            for line in lines:
                self._folder.add(json.loads(line), data, offset)
        except Exception:
            logging.getLogger(__name__).exception("status snapshots off: a record did not fold")
            self._folder = None
            return
        if not self._folder.due():
            return
        try:
            self._folder.write(self.rundir)
        except Exception as e:  # the next try after another EVERY records (the journal is stored)
            self._folder.written = self._folder.count
            logging.getLogger(__name__).warning("status snapshot not stored: %s", e)

    @property
    def durable(self) -> bool:
        with self._cond:
            return not self._pending

    def _writer(self) -> None:
        delay = 1.0
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                if not self._flush:  # let appends that come soon share this upload
                    self._cond.wait(FLUSH_S)
                batch = list(self._pending)
            try:
                if not self._opened:  # what earlier lives stored (a storage call: here)
                    self._folder, self._opened = _opened(self.rundir), True
                self._tiers.put(("\n".join(batch) + "\n").encode(), len(batch))
            except SegmentsLost as e:  # nothing more is written: it would begin a broken history
                with self._cond:
                    self._lost = self._lost_message(self.rundir.url(JOURNAL_DIR), f"deleted ({e})")
                    self.error = str(e)
                    self._cond.notify_all()
                return
            except Exception as e:  # storage outage: the records wait in memory
                with self._cond:
                    self.error = f"{type(e).__name__}: {e}"[:300]
                    self._cond.notify_all()
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
                continue
            delay = 1.0
            self._fold(batch)  # stored: a snapshot may cover them
            with self._cond:
                del self._pending[: len(batch)]
                self.error = None
                self._cond.notify_all()

    def flush(self, timeout: float = 0.0) -> bool:
        """Wait up to `timeout` until every record is in storage; True once it is."""
        if self.rundir.is_local:
            return True
        deadline = time.time() + timeout
        with self._cond:
            self._flush = True
            self._cond.notify_all()
            try:
                while self._pending:
                    if self._lost:  # they will not be stored
                        return False
                    left = deadline - time.time()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 1.0))
            finally:
                self._flush = False
        return True
