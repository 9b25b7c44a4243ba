"""The run's bookkeeping: where the job is, one collaborator of the supervisor with its own state.

Contract: `RunBook(spec, journal, control, records, on_progress, clock)` is rebuilt from the journal
so far (state, step, restarts, faults counted, skipped batches, training time), so a resumed
supervisor goes on where the dead one stopped. `to(state, cause)` is the one way the job's state
changes: it checks the transition table (`state.transition`), journals it with its cause and reports
progress. `ready()` and `progressed()` read what the watch saw: `group_ready` (STARTING -> RUNNING),
`recovered` (every pending fault's recovery, with the steps replayed), `progress` (at most every
PROGRESS_EVERY_S of `clock`) and `progress_stats`. `check_grace()` raises `Abort` once a stop's
grace has run out, `abort(reason)` ends the run STOPPED at once (`end_now`: from another thread, for
good); `nothing_to_save()` holds until this supervisor first sees a step trained (before, a stop
loses nothing and may end the run at once). The bookkeeping of one attempt (`restored`,
`data_steps`, the pending recoveries and rollback) is set by the supervisor, which acts; this object
only keeps and reports.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from resilient.config import JobSpec
from resilient.errors import Abort
from resilient.runlog.journal import Journal
from resilient.runlog.status import fold
from resilient.supervisor.faults import PendingRecovery, PendingRollback
from resilient.supervisor.state import TERMINAL, JobState, transition
from resilient.supervisor.watch import Ready, Seen

PROGRESS_EVERY_S = 2.0  # a `progress` record at most this often (and at the end of an attempt)
END_FLUSH_S = 10.0  # an end from another thread waits this long for the journal's storage
DATA_STEPS_KEPT = 10_000  # steps whose data steps are remembered (rollbacks look back a few)


class RunBook:
    def __init__(
        self,
        spec: JobSpec,
        journal: Journal,
        control,
        records: list[dict],
        on_progress: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`clock`: the supervisor's (a simulation's runs faster than the wall's)."""
        self.spec, self.journal, self.control, self.clock = spec, journal, control, clock
        self.on_progress = on_progress or (lambda s: None)
        status = fold(records)
        self.status_at_start = status
        self.state = JobState(status["state"])
        self.step = status["step"]
        self.restarts = status["restarts"]
        self.restored = status["step"]  # the step the current attempt restored
        self.fault_index = len(status["faults"])
        self.skip = sorted({b for r in status["rollbacks"] for b in r["skipped_batches"]})
        # seconds spent training (every rank stepping), over every attempt and life of the run
        self.training_s = max(
            (r.get("training_s", 0.0) for r in records if r["type"] == "progress"), default=0.0
        )
        self.pending_recoveries: list[PendingRecovery] = []  # faults acted on, not recovered
        self.pending_rollback: PendingRollback | None = None
        self.data_steps: dict[int, set[int]] = {}  # step -> data steps trained (rollback skips)
        self.stop_reason: str | None = None
        self.trained_here = False  # a step trained since this supervisor began
        self._last_progress_journal = 0.0
        self._lock = threading.RLock()  # `end_now` comes from another thread

    def to(self, new: JobState, cause: str) -> None:
        with self._lock:
            old, self.state = self.state, transition(self.state, new)
            self.journal.append(
                "transition", **{"from": old.value, "to": new.value, "cause": cause}
            )
        self.emit()

    def emit(self, **extra) -> None:
        total, restarts = self.spec.train.steps, self.restarts
        self.on_progress(
            dict(state=self.state.value, step=self.step, total=total, restarts=restarts, **extra)
        )

    def check_grace(self) -> None:
        deadline = self.control.stop_deadline
        if deadline is not None and time.time() > deadline:
            raise Abort(
                f"{self.stop_reason or 'stop'}: the grace of supervisor.grace_s="
                f"{self.spec.supervisor.grace_s:g}s ran out"
            )

    def abort(self, reason: str) -> None:
        """End the run now: STOPPED, saying that the step it stopped at may not be persisted."""
        if self.state in TERMINAL:
            return
        if self.state != JobState.STOPPING:
            self.to(JobState.STOPPING, f"stop requested: {reason}")
        self.to(
            JobState.STOPPED,
            f"{reason}; the newest persisted checkpoint is kept: "
            "`resilient launch --resume RUN_DIR` goes on from it",
        )

    def end_now(self, reason: str, only_if_nothing_to_save: bool = False) -> bool:
        """`abort(reason)` from another thread (the signals', while the main thread may be
        blocked in Ray), then the journal flushed (at most END_FLUSH_S); False, with nothing done,
        when told to end only with nothing to save and a step was seen since. Once it ended, the
        lock stays held: no state changes after it (the process exits next)."""
        self._lock.acquire()
        if only_if_nothing_to_save and not self.nothing_to_save():
            self._lock.release()
            return False
        self.abort(reason)
        self.journal.flush(timeout=END_FLUSH_S)
        return True

    def nothing_to_save(self) -> bool:
        """No step seen trained since this supervisor began, and the run not ended: what storage
        holds is all there is (memory tiers died with an older driver)."""
        return not self.trained_here and self.state not in TERMINAL

    def trained(self, pairs: list[tuple[int, int]]) -> None:
        """(step, data step) pairs the ranks reported: remembered for rollbacks."""
        for step, data_step in pairs:
            self.data_steps.setdefault(step, set()).add(data_step)
            self.data_steps.pop(step - DATA_STEPS_KEPT, None)  # a rollback looks back a few steps

    def ready(self, ready: Ready, restored: int) -> None:
        self.journal.append(
            "group_ready",
            restore_s=ready.restore_s,
            restored_step=restored,
            ready_at=ready.ready_at,
        )
        if self.state == JobState.STARTING:
            self.to(JobState.RUNNING, "all ranks training")

    def progressed(self, seen: Seen) -> None:
        self.step, self.trained_here = seen.step, True
        self._recovered(seen)
        h0 = seen.latest.get(0)
        loss, tps = (h0.mean_loss, h0.tokens_per_s) if h0 else (None, None)
        now = self.clock()
        if seen.ended or now - self._last_progress_journal >= PROGRESS_EVERY_S:
            self._last_progress_journal = now
            self.journal.append(
                "progress",
                step=self.step,
                loss=loss,
                tokens_per_s=tps,
                training_s=round(self.training_s, 3),
            )
        if seen.median_step_s is not None:
            self.journal.append("progress_stats", median_step_s=seen.median_step_s)
        self.emit(loss=loss, tokens_per_s=tps)

    def _recovered(self, seen: Seen) -> None:
        # every fault acted on since the last step past its restore point closes together: a
        # fault during another's recovery (or a recovery that runs to the job's end) is recovered
        # by the same first step, so none is left open
        done = [
            p
            for p in self.pending_recoveries
            if self.step > p.restored_step or seen.ended == "done"
        ]
        if not done:
            return
        done_at = max(
            h.first_step_done_at or h.step_done_at or seen.now for h in seen.latest.values()
        )
        for p in done:
            start = p.fault.injected_at or p.fault.detected_at
            self.journal.append(
                "recovered",
                fault_index=p.fault_index,
                recovered_at=done_at,
                recovery_s=round(max(0.0, done_at - start), 3),
                steps_replayed=max(0, p.fault.step - 1 - p.restored_step),
            )
        self.pending_recoveries = [p for p in self.pending_recoveries if p not in done]
