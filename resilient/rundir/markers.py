"""Chaos markers: one record in `chaos/` per fault that fired, written before the damage is done.

Contract: the only module that names, writes and reads markers. One name format,
`chaos/fired-<key>.json`, where `key` is `planned_key(index)` for the `[[chaos]]` entry `index`,
`random_key(n)` for the n-th fault of random chaos, or `request_key(id)` for a `resilient chaos
inject` request. A restarted group or a resumed supervisor
reads them (`read_all`) and never fires the same planned fault twice; the chaos report matches
them with what the supervisor noticed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from resilient.rundir.fs import RunDir
from resilient.rundir.layout import CHAOS

PREFIX = "fired-"


@dataclass(frozen=True)
class FiredFault:
    """A fault that fired: what, where, at which step and when."""

    key: str
    fault: str
    injected_at: float
    step: int | None = None  # the step that was starting (or under way) when it fired
    rank: int | None = None
    node: str | None = None  # the node's Ray id, for node (GPU) faults
    index: int | None = None  # the `[[chaos]]` entry, for planned faults
    request: str | None = None  # the request id, for `resilient chaos inject`
    damaged_step: int | None = None  # corrupt_checkpoint: the checkpoint it damaged


def planned_key(index: int) -> str:
    return f"{index:04d}"


def request_key(req_id: str) -> str:
    return f"req-{req_id}"


def random_key(n: int) -> str:
    """The `n`-th fault drawn by random chaos."""
    return f"rnd-{n:06d}"


def path(key: str) -> str:
    return f"{CHAOS}/{PREFIX}{key}.json"


def write(rundir: RunDir, fired: FiredFault) -> None:
    """Write the marker (atomically; raises on a storage error: callers decide if it is fatal)."""
    rundir.write_json(path(fired.key), asdict(fired))


def _load(rec: dict) -> FiredFault:
    known = {f.name for f in fields(FiredFault)}
    return FiredFault(**{k: v for k, v in rec.items() if k in known})


def read(rundir: RunDir, key: str) -> FiredFault | None:
    """The marker of `key`, or None when it has not fired (a storage error is raised)."""
    try:
        return _load(rundir.read_json(path(key)))
    except FileNotFoundError:
        return None


def read_all(rundir: RunDir) -> list[FiredFault]:
    """Every marker of the run, by key; unreadable ones (half-written, foreign) are left out."""
    out = []
    for name in rundir.listdir(CHAOS):
        if not (name.startswith(PREFIX) and name.endswith(".json")):
            continue
        try:
            rec = rundir.read_json(f"{CHAOS}/{name}")
            out.append(_load(rec))
        except (OSError, ValueError, TypeError, json.JSONDecodeError):
            continue
    return out
