"""Where a worker group restores from, and the load of that snapshot.

Contract: `RestoreSource` names the freshest verified copy the supervisor found (`step`, the `tier`
holding it: memory, peer or storage, the node and the NodeAgent serving it, None for storage).
`load(source, store, fingerprint)` fetches that snapshot, verified (checksums, step, fingerprint),
from the agent's memory or from storage; it raises `CheckpointInvalid` when it does not verify.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from resilient.checkpoint.snapshot import META, SHARED, Snapshot
from resilient.checkpoint.storage import CheckpointStore

TIER_ORDER = {"memory": 0, "peer": 1, "storage": 2}  # for equal steps, the first one wins


@dataclass(frozen=True)
class RestoreSource:
    step: int
    tier: str  # memory | peer | storage
    node: str | None = None
    agent: Any = None  # the NodeAgent handle holding it; None: storage


@dataclass(frozen=True)
class Lookup:
    """What a search for the freshest copy found: the `source` (None: no copy verifies), why each
    newer copy was skipped, `storage_error` when storage could not be listed or read (then
    "no copy" means "unknown", never "start from scratch"), and the `damaged` steps: stored
    copies that were read whole and failed verification (known bad, not merely unreadable)."""

    source: RestoreSource | None
    skipped: list[str] = field(default_factory=list)
    storage_error: str | None = None
    damaged: frozenset[int] = frozenset()


def load(source: RestoreSource, store: CheckpointStore, fingerprint: str) -> Snapshot:
    """The snapshot `source` names, verified."""
    if source.agent is not None:
        got = ray.get(source.agent.fetch.remote(source.step, [SHARED, META], fingerprint))
        return Snapshot.from_files(got["files"])
    return Snapshot.from_files(store.load(source.step, fingerprint))
