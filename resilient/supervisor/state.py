"""The table of allowed state changes.

Contract: `transition(current, new)` returns `new` if the table allows it and raises
`IllegalTransition` otherwise. The supervisor changes state only through it (and journals each).
The states themselves (`JobState`, `TERMINAL`) are the run log's: status readers need them too.
A stop (`resilient stop`, SIGTERM, SIGINT) may come in any state that has not ended.
"""

from __future__ import annotations

from resilient.runlog.states import TERMINAL, JobState

__all__ = ["ALLOWED", "TERMINAL", "IllegalTransition", "JobState", "transition"]

S = JobState
ALLOWED: dict[JobState, frozenset[JobState]] = {
    S.PENDING: frozenset({S.PREFLIGHT, S.STOPPING, S.FAILED}),
    S.PREFLIGHT: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    S.STARTING: frozenset({S.RUNNING, S.DIAGNOSING, S.RESIZING, S.STOPPING, S.FAILED}),
    S.RUNNING: frozenset({S.DIAGNOSING, S.RESIZING, S.STOPPING, S.SUCCEEDED, S.FAILED}),
    S.DIAGNOSING: frozenset({S.RESTARTING, S.ROLLING_BACK, S.RESIZING, S.STOPPING, S.FAILED}),
    S.RESTARTING: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    S.ROLLING_BACK: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    S.RESIZING: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
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
