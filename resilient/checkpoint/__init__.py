"""TCE: what a training state is, how it is serialised (safetensors + JSON) and committed to
storage.

`Snapshot` (which needs torch) is imported on first use, not with the package: a warm spare's actor
class imports this package at normal priority, and torch belongs to its idle-priority warm-up.
"""

from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore

__all__ = ["Snapshot", "CheckpointStore", "CheckpointInvalid"]


def __getattr__(name: str):
    if name == "Snapshot":
        from resilient.checkpoint.snapshot import Snapshot

        return Snapshot
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
