"""A log kept as immutable segments in a run directory, merged in tiers: cost linear in the run.

Contract: `Tiers(rundir, prefix, ext, merge, fanout)` holds a sequence of items (journal records,
metric rows) as objects that are never rewritten: `put(data, count)` writes the next `count` items
as a level-0 segment; once `fanout[i]` segments share level i they are merged (by `merge`, bytes of
segments in order -> bytes) into one segment of level i+1, written before its sources are deleted.
The top level (`len(fanout)`) is never merged, except by `seal()`, which merges every segment below
it into one (the end of a job). So each item is uploaded at most `len(fanout) + 1` times (+1 with
`seal`) and the objects grow with the log's size over the top level's span, not with its appends.
Names carry the level and the first and last item number (`L1-000000000016-000000000031.jsonl`);
`covering(names)` picks the segments that hold every item exactly once, so a reader is right while
a merged segment and its sources coexist, and a gap (a lost segment) is an error, never a silence.
Segments found at open (a resumed run) are read back only when a merge needs them, and so is
every merged segment: the writer keeps the bytes of the level-0 segments only (at most
`fanout[0]` of them), so its memory is bounded by one merge, not by the top level's span (one
read per merged segment when it is merged in turn: `fanout[1]` reads per top-level segment).
With `guard=True`, `put` first checks that the segments holding the log's first and last items
(as this writer stored or found them) are still there (two existence checks a put, `RunDir.gone`:
an outage raises, never reads as a deletion), and a merge that finds a source missing does the
same: `SegmentsLost` says the log was deleted behind the writer's back (a deletion that lists
first and deletes after may spare a segment uploaded meanwhile, never the first), and a segment
written after it would begin a log with a gap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from resilient.rundir.fs import RunDir

NAME = re.compile(r"^L(\d)-(\d{12})-(\d{12})(\.\w+)$")


class SegmentGap(Exception):
    """Items between two segments are missing: the log is damaged, not short."""


class SegmentsLost(Exception):
    """A segment a guarded writer relies on (the first, the newest, a merge's source) is gone:
    something else deleted the log."""


@dataclass(frozen=True)
class Segment:
    level: int
    first: int
    last: int
    name: str


def segment_name(level: int, first: int, last: int, ext: str) -> str:
    return f"L{level}-{first:012d}-{last:012d}{ext}"


def parse(name: str) -> Segment | None:
    m = NAME.match(name)
    return Segment(int(m[1]), int(m[2]), int(m[3]), name) if m else None


def covering(names: list[str]) -> list[Segment]:
    """The segments, in order, that hold every item once (a merged segment wins over the sources
    it was made of); SegmentGap when an item is in none."""
    segs = sorted((s for s in map(parse, names) if s), key=lambda s: (s.first, -s.last))
    out: list[Segment] = []
    for s in segs:
        if out and s.last <= out[-1].last:
            continue  # inside one already taken (a source of a merged segment)
        if out and s.first != out[-1].last + 1:
            raise SegmentGap(f"items {out[-1].last + 1}..{s.first - 1} are in no segment")
        out.append(s)
    if out and out[0].first != 0:
        raise SegmentGap(f"items 0..{out[0].first - 1} are in no segment")
    return out


class Tiers:
    def __init__(
        self,
        rundir: RunDir,
        prefix: str,
        ext: str,
        merge: Callable[[list[bytes]], bytes],
        fanout: tuple[int, ...],
        guard: bool = False,
    ):
        self.rundir, self.prefix, self.ext = rundir, prefix, ext
        self.merge, self.fanout, self.top = merge, fanout, len(fanout)
        self.guard = guard
        self.next: int | None = None  # the next item's number; None until the log is listed
        self.newest: Segment | None = None  # the stored segment that holds the last item
        self.oldest: Segment | None = None  # ... and the one that holds item 0
        # per level below the top: [segment, its bytes (level 0) or None (read when merged)]
        self.levels: list[list[tuple[Segment, bytes | None]]] = [[] for _ in fanout]

    def open(self) -> None:
        """List what is stored already (a resumed run). Done by the first write, so building a
        writer costs no storage call (storage may be down then)."""
        found = covering(self.rundir.listdir(self.prefix))
        self.next = found[-1].last + 1 if found else 0
        self.newest = found[-1] if found else None
        self.oldest = found[0] if found else None
        self.levels = [[] for _ in self.fanout]
        for s in found:
            if s.level < self.top:
                self.levels[s.level].append((s, None))

    def put(self, data: bytes, count: int) -> None:
        """Write the next `count` items (raises on a storage error: nothing changed then)."""
        if self.next is None:
            self.open()
        if self.guard:
            for which, seg in (("first", self.oldest), ("newest", self.newest)):
                if seg and self.rundir.gone(f"{self.prefix}/{seg.name}"):
                    raise SegmentsLost(f"its {which} segment, {seg.name}, is gone")
        first, last = self.next, self.next + count - 1
        seg = Segment(0, first, last, segment_name(0, first, last, self.ext))
        self.rundir.write_bytes(f"{self.prefix}/{seg.name}", data)
        self.next += count
        self.newest = seg
        self.oldest = self.oldest or seg
        self.levels[0].append((seg, data))
        self.compact()

    def compact(self) -> None:
        """Merge every level that is full; a storage error leaves it for the next call (the
        segments it would merge are stored already, so nothing is lost meanwhile)."""
        for level, want in enumerate(self.fanout):
            if len(self.levels[level]) >= want:
                try:
                    self._merge(level, level + 1)
                except FileNotFoundError as e:  # a source deleted by someone else: a gap
                    if self.guard:
                        raise SegmentsLost(f"a segment to merge is gone ({e})") from None
                    return
                except Exception:
                    return

    def seal(self) -> None:
        """Merge every segment below the top level into one top-level segment."""
        if self.next is None:
            self.open()
        group = sorted((g for level in self.levels for g in level), key=lambda g: g[0].first)
        if group:
            self._write_merged(group, self.top)
            self.levels = [[] for _ in self.fanout]

    def _merge(self, level: int, into: int) -> None:
        seg, _ = self._write_merged(self.levels[level], into)
        self.levels[level] = []
        if into < self.top:  # its bytes are not kept: read back when it is merged in turn
            self.levels[into].append((seg, None))

    def _write_merged(
        self, group: list[tuple[Segment, bytes | None]], into: int
    ) -> tuple[Segment, bytes]:
        """One segment of level `into` holding `group` (contiguous, in order); the sources are
        deleted once it is written."""
        blobs = [data if data is not None else self._read(s) for s, data in group]
        first, last = group[0][0].first, group[-1][0].last
        merged = self.merge(blobs)
        seg = Segment(into, first, last, segment_name(into, first, last, self.ext))
        self.rundir.write_bytes(f"{self.prefix}/{seg.name}", merged)
        if self.next is not None and last == self.next - 1:
            self.newest = seg  # its sources go next
        if first == 0:
            self.oldest = seg
        for s, _ in group:  # the merged segment is in place: its sources may go
            try:
                self.rundir.remove(f"{self.prefix}/{s.name}")
            except Exception:  # left behind: readers skip it (covering); it only costs a name
                pass
        return seg, merged

    def _read(self, s: Segment) -> bytes:
        return self.rundir.read_bytes(f"{self.prefix}/{s.name}")


def read_segments(rundir: RunDir, prefix: str) -> list[tuple[Segment, bytes]]:
    """Every item of the log once, as (segment, bytes), in order."""
    return [(s, rundir.read_bytes(f"{prefix}/{s.name}")) for s in covering(rundir.listdir(prefix))]


class SegmentCache:
    """Reads a tiered log again and again (a live dashboard), downloading each segment once: a
    merged segment whose items are all cached already is composed from them, not downloaded.
    `decode(segment, bytes)` turns a segment into its list of entries."""

    def __init__(self, rundir: RunDir, prefix: str, decode: Callable[[Segment, bytes], list]):
        self.rundir, self.prefix, self.decode = rundir, prefix, decode
        self.cache: dict[tuple[int, int], list] = {}

    def entries(self) -> list:
        out, keep = [], {}
        for s in covering(self.rundir.listdir(self.prefix)):
            got = self.cache.get((s.first, s.last))
            if got is None:
                got = self._compose(s)
            if got is None:
                got = self.decode(s, self.rundir.read_bytes(f"{self.prefix}/{s.name}"))
            keep[(s.first, s.last)] = got
            out += got
        self.cache = keep
        return out

    def _compose(self, s: Segment) -> list | None:
        parts, at = [], s.first
        by_first = {first: (first, last) for first, last in self.cache}
        while at <= s.last:
            key = by_first.get(at)
            if key is None or key[1] > s.last:
                return None
            parts += self.cache[key]
            at = key[1] + 1
        return parts
