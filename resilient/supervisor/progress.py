"""The supervisor's reading of progress: a group became ready, the job-wide step advanced. A mixin
of `Supervisor` (same contract): it journals `group_ready`, `recovered` (every pending fault's
recovery, with the steps replayed), `progress` (at most every `PROGRESS_EVERY_S`) and
`progress_stats`, and moves STARTING to RUNNING.
"""

from __future__ import annotations

import time

from resilient.supervisor.state import JobState
from resilient.supervisor.watch import Ready, Seen

PROGRESS_EVERY_S = 2.0  # a `progress` record at most this often (and at the end of an attempt)


class Progress:
    def _ready(self, ready: Ready, restored: int) -> None:
        self.journal.append(
            "group_ready",
            restore_s=ready.restore_s,
            restored_step=restored,
            ready_at=ready.ready_at,
        )
        if self.state == JobState.STARTING:
            self._to(JobState.RUNNING, "all ranks training")

    def _progress(self, seen: Seen) -> None:
        self.step = seen.step
        # every fault acted on since the last step past its restore point closes together: a
        # fault during another's recovery (or a recovery that runs to the job's end) is recovered
        # by the same first step, so none is left open
        done = [
            p
            for p in self.pending_recoveries
            if self.step > p.restored_step or seen.ended == "done"
        ]
        if done:
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
        h0 = seen.latest.get(0)
        loss, tps = (h0.mean_loss, h0.tokens_per_s) if h0 else (None, None)
        now = time.time()
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
        self._emit(loss=loss, tokens_per_s=tps)
