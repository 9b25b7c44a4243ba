"""Heartbeat: one rank's answer, the supervisor's only window into it.

Contract: a TrainWorker answers every heartbeat (on a thread of its own, in every phase) with a
`Heartbeat`: its phase and progress, and what it did since the previous answer (per-step metrics,
snapshots handed over), each reported once. Phases: created -> rendezvous -> loading -> restoring
-> training (<-> evaluating, after a due step) -> [rank 0: persisting -> exporting] -> done |
stopped; or pausing -> paused (a resize at an agreed step); or error (with `error` and
`error_at`) or nonfinite (a NaN/Inf step that no rank applied) or sdc (replica digests or a
compute audit disagreed after a step, which no rank snapshotted; with `sdc`). A survivor that
starts again goes through the same phases from created. `step_record()` is the per-step record a
heartbeat carries in `metrics`; `merged(a, b)` is one heartbeat for two answers of a rank, `b` the
later one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

# Two polls of the supervisor this much further apart than they ask for: it was away (its process
# stopped, starved or swapped out), and what its clocks ran meanwhile says nothing of the ranks: a
# GC pause or a journal write takes milliseconds, a Ctrl-Z or a paused VM seconds, during which
# the ranks went on and their answers waited unread.
AWAY_S = 1.0

# past the start
TRAINING = frozenset(
    {
        "training",
        "evaluating",
        "verifying",
        "persisting",
        "exporting",
        "done",
        "stopped",
        "pausing",
        "paused",
    }
)


@dataclass(frozen=True)
class Heartbeat:
    rank: int
    pid: int
    phase: str
    now: float  # the rank's clock when it answered
    step: int = 0  # the last step it finished
    error: str | None = None  # phase "error": the exception and a short traceback
    error_at: float | None = None  # when it failed: the first rank to fail is the cause
    metrics: tuple[dict, ...] = ()  # one record per step finished since the previous answer
    checkpoints: tuple[dict, ...] = ()  # snapshots handed to the node agent since then
    snapshot_step: int | None = None  # the newest snapshot this rank holds in its own memory
    chaos_request: int | None = None  # rank 0 holds at a job-wide fault's step until it is done
    restore_s: float = 0.0  # seconds its restore took
    training_at: float | None = None  # when it started training (restore done)
    step_done_at: float | None = None  # when it finished its last step
    first_step_done_at: float | None = None  # when it finished its first step of this attempt
    mean_loss: float | None = None  # the job-wide mean loss of its last step
    tokens_per_s: float | None = None
    logs: tuple[str, ...] = ()  # lines the process wrote since the previous answer (agents.output)
    evals: tuple[dict, ...] = ()  # rank 0: evaluations finished since then (training.evaluation)
    sdc: dict | None = None  # phase "sdc": the replicas' disagreement (agents.verify's report)

    @property
    def past_start(self) -> bool:
        """Started and restored: training or past it."""
        return self.phase in TRAINING


def step_record(r, rank: int, step: int, data_step: int, attempt: int) -> dict:
    """A heartbeat's per-step record of one rank from its `StepResult` `r` (the training metrics'
    Parquet row)."""
    return {
        "t": time.time(),
        "rank": rank,
        "step": step,
        "data_step": data_step,
        "loss": r.loss,
        "mean_loss": r.mean_loss,
        "grad_norm": r.grad_norm,
        "step_time": r.step_time,
        "compute_s": r.compute_s,
        "data_wait": r.data_wait,
        "attempt": attempt,
        "tokens_per_s": r.tokens / max(r.step_time + r.data_wait, 1e-9),
        "overflow": r.overflow,
        "lr": r.lr,
    }


def add_answer(answers: dict[int, Heartbeat], rank: int, hb: Heartbeat) -> None:
    """`hb` into `answers`, merged with the answer of `rank` already there, the older first."""
    if rank in answers:
        hb = merged(*sorted((answers[rank], hb), key=lambda h: h.now))
    answers[rank] = hb


def merged(a: Heartbeat, b: Heartbeat) -> Heartbeat:
    """`b` (the later answer), carrying what `a` reported too, in order."""
    return replace(
        b,
        metrics=a.metrics + b.metrics,
        checkpoints=a.checkpoints + b.checkpoints,
        logs=a.logs + b.logs,
        evals=a.evals + b.evals,
    )
