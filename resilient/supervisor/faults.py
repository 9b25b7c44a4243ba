"""Faults the supervisor notices and the decisions its policy makes: small frozen values with evidence."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class FaultKind(str, Enum):
    CRASH = "crash"            # a worker process died (actor death)
    HANG = "hang"              # a rank stopped answering or stopped making progress
    ERROR = "error"            # the training code raised (e.g. a collective failed)
    START_TIMEOUT = "start_timeout"  # a worker group did not start in supervisor.start_timeout
    ANOMALY = "anomaly"        # the anomaly detector raised an actionable event (hardware, NaN, spike)


class Action(str, Enum):
    RESTART = "restart"        # restart the whole worker group from the newest checkpoint
    CORDON = "cordon"          # exclude the node(s) and restart the group without them
    ROLLBACK = "rollback"      # restart from a checkpoint before the anomaly, skipping the bad batches
    GIVE_UP = "give_up"        # end the job as FAILED with the reason


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    rank: int | None
    step: int                  # the step that was running when it happened
    detected_at: float
    evidence: str
    injected_at: float | None = None   # when a planned (chaos) fault fired, if it was one
    node: str | None = None
    anomaly: str | None = None         # ANOMALY: the event kind (gpu_xid, nan, loss_spike, ...)
    suggested: str | None = None       # ANOMALY: the detector's suggested action
    rollback_to: int | None = None     # ANOMALY: newest step known to be good
    skip_batches: tuple[int, ...] = ()  # ANOMALY: data steps to take out of the order

    def to_record(self) -> dict:
        d = asdict(self)
        d["kind"] = self.anomaly or self.kind.value  # what went wrong, e.g. "crash", "hang", "gpu_xid", "nan"
        d["fault_class"] = self.kind.value
        d["skip_batches"] = list(self.skip_batches)
        return d


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    delay_s: float = 0.0
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)
    rollback_to: int | None = None
    skip_batches: tuple[int, ...] = ()

    def to_record(self) -> dict:
        d = asdict(self)
        d["action"] = self.action.value
        d["exclude_nodes"] = list(self.exclude_nodes)
        d["skip_batches"] = list(self.skip_batches)
        return d
