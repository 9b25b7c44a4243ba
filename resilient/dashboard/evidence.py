"""What the dashboard shows when a fault's row is opened: the journal records around the fault and
the lines its rank printed before it (and the first of its replacement's).

Contract: `faults(records)` lists the fault records in order (a fault's index is its place here, as
in `status --json`). `around(records, index, before, after)` the fault record's neighbours in the
journal, skipping the per-step noise (`progress`, `progress_stats`, memory `checkpoint` records).
`log_excerpt(lines, at, before, after)`: the `before` lines of a rank's log up to time `at` and
the `after` lines following it, placed in time by the timestamp Python's logging puts at the start
of a line (`2026-12-05 13:02:41,123`, the worker's local time, read in the dashboard's zone: the
same on one site's cluster; a line without one, a traceback's, belongs with the line above it);
a log without any timestamp gives its last lines. Pure.
"""

from __future__ import annotations

import re
from datetime import datetime

NOISE = frozenset({"progress", "progress_stats", "checkpoint", "anomaly"})
STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3})")


def faults(records: list[dict]) -> list[tuple[int, dict]]:
    """(position in the journal, record) of every fault, in order."""
    return [(i, r) for i, r in enumerate(records) if r["type"] == "fault"]


def around(records: list[dict], index: int, before: int = 12, after: int = 24) -> list[dict]:
    found = faults(records)
    if not 0 <= index < len(found):
        return []
    at = found[index][0]
    earlier = [r for r in records[max(0, at - 20 * before) : at] if r["type"] not in NOISE]
    later = [r for r in records[at + 1 : at + 1 + 20 * after] if r["type"] not in NOISE]
    return earlier[-before:] + [records[at]] + later[:after]


def stamp(line: str) -> float | None:
    """The time at the start of a logging line (local time), or None."""
    m = STAMP.match(line)
    if not m:
        return None
    try:
        return datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1000
    except ValueError:
        return None


def log_excerpt(lines: list[str], at: float, before: int = 30, after: int = 10) -> dict:
    """{"lines": [...], "cut": how many of them came before `at`}."""
    times, last = [], None
    for line in lines:
        last = stamp(line) or last
        times.append(last)
    if all(t is None for t in times):
        return {"lines": lines[-before:], "cut": min(len(lines), before)}
    # the first stamped line after `at` starts the rest (stamps of several threads interleave)
    cut = next((i for i, t in enumerate(times) if t is not None and t > at), len(lines))
    start = max(0, cut - before)
    return {"lines": lines[start : cut + after], "cut": cut - start}
