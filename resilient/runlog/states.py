"""The states a job can be in, as journalled; which ones end it.

Contract: `JobState` values are the `state` of `resilient status` and the `to` of every
`transition` record; `TERMINAL` are the states a run never leaves (a `resume` record starts a new
life from PENDING). Which changes are allowed is the supervisor's table (`supervisor.state`).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    PENDING = "PENDING"
    PREFLIGHT = "PREFLIGHT"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    DIAGNOSING = "DIAGNOSING"
    RESTARTING = "RESTARTING"
    ROLLING_BACK = "ROLLING_BACK"
    RESIZING = "RESIZING"  # elastic: going on with another number of ranks (or waiting for one)
    STOPPING = "STOPPING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    STOPPED = "STOPPED"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED})
