"""The restart budget's bookkeeping: runs of faults, as `policy.decide` counts them.

Contract: `Budget(cfg, records)` is rebuilt from the journal (the `restart` records carry the
counts), so a resumed supervisor counts on where the dead one stopped. `history(fault, progress,
stopping, now)` is what the policy sees for a fault that came `progress` steps into its attempt: a
fault after at least `supervisor.progress_steps` steps ends the run of faults before it;
`restarted(fault, now)` counts a restart and returns the counts for its journal record.
"""

from __future__ import annotations

from collections import deque

from resilient.config import SupervisorConfig
from resilient.supervisor.faults import Fault, History
from resilient.supervisor.policy import is_rollback

HOUR = 3600.0


class Budget:
    def __init__(self, cfg: SupervisorConfig, records: list[dict]):
        self.cfg = cfg
        restarts = [r for r in records if r["type"] == "restart"]
        last = restarts[-1] if restarts else {}
        self.streak = last.get("streak", 0)
        self.rollback_streak = last.get("rollback_streak", 0)
        self.times = deque(r["t"] for r in restarts[-1000:])

    def history(self, progress: int, stopping: bool, now: float) -> History:
        if progress >= self.cfg.progress_steps:
            self.streak = self.rollback_streak = 0
        while self.times and self.times[0] < now - HOUR:
            self.times.popleft()
        return History(self.streak, stopping, self.rollback_streak, len(self.times))

    def restarted(self, fault: Fault, now: float) -> dict:
        if is_rollback(fault):
            self.rollback_streak += 1
        else:
            self.streak += 1
        self.times.append(now)
        return {"streak": self.streak, "rollback_streak": self.rollback_streak}
