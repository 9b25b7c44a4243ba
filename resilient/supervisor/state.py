"""JobState and the table of allowed transitions.

Contract: `transition(current, new)` returns `new` if the table allows it and raises
`IllegalTransition` otherwise. The supervisor changes state only through it (and journals each).
"""
from __future__ import annotations

from enum import Enum


class JobState(str, Enum):
    PENDING = "PENDING"
    PREFLIGHT = "PREFLIGHT"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DIAGNOSING = "DIAGNOSING"
    RESTARTING = "RESTARTING"
    ROLLING_BACK = "ROLLING_BACK"
    RESIZING = "RESIZING"
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


S = JobState
TERMINAL = frozenset({S.SUCCEEDED, S.FAILED, S.STOPPED})

ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.PREFLIGHT, S.FAILED}),
    S.PREFLIGHT: frozenset({S.STARTING, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.DIAGNOSING, S.STOPPING, S.FAILED}),
    S.RUNNING: frozenset({S.DIAGNOSING, S.STOPPING, S.SUCCEEDED, S.FAILED}),
    S.DIAGNOSING: frozenset({S.RESTARTING, S.ROLLING_BACK, S.RESIZING, S.FAILED}),
    S.RESTARTING: frozenset({S.STARTING, S.FAILED}),
    S.ROLLING_BACK: frozenset({S.STARTING, S.FAILED}),
    S.RESIZING: frozenset({S.STARTING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change the table does not allow: a bug in the supervisor, never a user error."""


def transition(current: JobState, new: JobState) -> JobState:
    if new not in ALLOWED[current]:
        raise IllegalTransition(f"{current.value} -> {new.value} is not allowed")
    return new
