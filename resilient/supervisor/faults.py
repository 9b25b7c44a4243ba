"""Faults the supervisor notices and the decisions its policy makes: small frozen values with evidence."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class FaultKind(str, Enum):
    CRASH = "crash"            # a worker process died (actor death)
    HANG = "hang"              # a rank stopped answering or stopped making progress
    ERROR = "error"            # the training code raised (e.g. a collective failed)
    START_TIMEOUT = "start_timeout"  # a worker group did not start in supervisor.start_timeout


class Action(str, Enum):
    RESTART = "restart"        # restart the whole worker group from the newest checkpoint
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

    def to_record(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    delay_s: float = 0.0
    exclude_nodes: tuple[str, ...] = field(default_factory=tuple)

    def to_record(self) -> dict:
        d = asdict(self)
        d["action"] = self.action.value
        d["exclude_nodes"] = list(self.exclude_nodes)
        return d
