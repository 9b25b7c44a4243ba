"""What the supervisor notices and what its policy decides: small frozen values with evidence.

Contract: `Fault` (what went wrong, where, when, with its evidence) and `History` go into the
policy; `Decision` (what to do, and why) and `Verdict` (what an anomaly event means) come out.
`PendingRecovery` and `PendingRollback` are what the supervisor carries from one attempt to the
next. All are immutable; `to_record()` gives the journal's form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum


class FaultKind(StrEnum):
    CRASH = "crash"  # a worker process died (actor death)
    HANG = "hang"  # a rank stopped answering or stopped making progress
    ERROR = "error"  # the training code raised (e.g. a collective failed)
    START_TIMEOUT = "start_timeout"  # a worker group did not start in supervisor.start_timeout
    ANOMALY = "anomaly"  # the anomaly detector raised an actionable event (hardware, NaN, spike)
    NODE_LOSS = "node_loss"  # a node's processes are gone (its raylet refuses): every rank on it
    PARTITION = "partition"  # a node answers nothing (its raylet unreachable): every rank on it
    SDC = "sdc"  # silent data corruption: replicas' digests differ, or a rank's work does not
    # reproduce elsewhere (the compute audit)


NODE_FAULTS = (FaultKind.NODE_LOSS, FaultKind.PARTITION)


class Action(StrEnum):
    RESTART = "restart"  # restart the whole worker group from the newest checkpoint
    CORDON = "cordon"  # exclude the node(s) and restart the group without them
    ROLLBACK = "rollback"  # restart from a checkpoint before the anomaly, skipping the bad batches
    GIVE_UP = "give_up"  # end the job as FAILED with the reason
    STOP = "stop"  # end the job as STOPPED: a fault while a stop signal's stop was under way


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    rank: int | None
    step: int  # the step that was running when it happened
    detected_at: float
    evidence: str
    injected_at: float | None = None  # when a planned (chaos) fault fired, if it was one
    node: str | None = None
    anomaly: str | None = None  # ANOMALY: the event kind (gpu_xid, nan, loss_spike, ...)
    suggested: str | None = None  # ANOMALY: the detector's suggested action
    rollback_to: int | None = None  # ANOMALY: newest step known to be good
    skip_batches: tuple[int, ...] = ()  # ANOMALY: data steps to take out of the order
    chaos_key: str | None = None  # the chaos marker of the fault that caused it, if one did
    everywhere: bool = False  # ERROR: every rank failed the same way before training started

    def to_record(self) -> dict:
        d = asdict(self)
        d["kind"] = self.anomaly or self.kind.value  # what went wrong: crash, hang, gpu_xid, nan...
        d["fault_class"] = self.kind.value
        d["skip_batches"] = list(self.skip_batches)
        return d


@dataclass(frozen=True)
class History:
    """What the policy may know of the job besides the fault. A fault that comes after at least
    `supervisor.progress_steps` steps of training ends a run of faults (`streak` back to 0)."""

    streak: int = 0  # faults in a row (NaN/spike rollbacks aside), too close to recover from
    stopping: bool = False  # a stop was requested and is under way
    stop_signal: str | None = None  # stopping on a signal: its stop reason ("SIGTERM (...)")
    rollback_streak: int = 0  # NaN/spike rollbacks in a row, the same way
    last_hour: int = 0  # restarts within the last hour (supervisor.max_restarts_per_hour)
    node_offences: int = 0  # earlier faults of this fault's kind (straggler, sdc) on its node
    other_nodes: int = 1  # healthy nodes besides the fault's (a straggler's node is cordoned
    # only where the job can go on elsewhere)
    on_cordoned: bool = False  # a rank of the group is on a node cordoned since it started
    # (another fault of the same poll): no rank is kept there, so the whole group restarts


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    delay_s: float = 0.0
    exclude_nodes: tuple[str, ...] = ()
    rollback_to: int | None = None
    skip_batches: tuple[int, ...] = ()
    keep_survivors: bool = False  # RESTART, ROLLBACK: replace only the failed rank, keep the others

    def to_record(self) -> dict:
        d = asdict(self)
        d["action"] = self.action.value
        d["exclude_nodes"] = list(self.exclude_nodes)
        d["skip_batches"] = list(self.skip_batches)
        return d


@dataclass(frozen=True)
class Verdict:
    """What an anomaly event means for the job: the `decision` the journal records with it (warn,
    cordon_only, restart, rollback, cordon), a node to `cordon` at once without a restart
    (node, reason), and the `fault` to act on (None: training goes on)."""

    decision: str
    cordon: tuple[str, str] | None = None
    fault: Fault | None = None


@dataclass(frozen=True)
class PendingRecovery:
    """A fault acted on, not yet recovered: recovered when a step past `restored_step` is done."""

    fault_index: int
    fault: Fault
    restored_step: int = 0


@dataclass(frozen=True)
class PendingRollback:
    """A rollback decided: the next attempt restores a state at or before `rollback_to` and takes
    `skip_batches` out of the data order."""

    from_step: int
    rollback_to: int | None
    skip_batches: tuple[int, ...]
    reason: str
