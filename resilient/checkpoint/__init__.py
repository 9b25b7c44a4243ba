"""TCE: what a training state is, how it is serialised (safetensors + JSON) and committed to
storage."""

from resilient.checkpoint.snapshot import Snapshot
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore

__all__ = ["Snapshot", "CheckpointStore", "CheckpointInvalid"]
