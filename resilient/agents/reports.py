"""Reports: what a rank has to tell the supervisor since its last heartbeat.

Contract: `step(r, rank, step, data_step, attempt)` adds the step's record (`heartbeat.step_record`;
the newest METRICS_CAP are kept while nobody drains them), `evaluation(rec)` an evaluation's
(rank 0), `drain()` returns both lists and empties them (each record reported once), `clear()`
forgets them (a new life reports nothing of the previous one). Thread-safe: the training thread
adds, the heartbeat thread drains.
"""

from __future__ import annotations

import threading
from collections import deque

from resilient.agents.heartbeat import step_record

METRICS_CAP = 5000  # per-step records kept while nobody drains them (the newest win)


class Reports:
    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: deque[dict] = deque(maxlen=METRICS_CAP)
        self._evals: list[dict] = []

    def step(self, r, rank: int, step: int, data_step: int, attempt: int) -> None:
        rec = step_record(r, rank, step, data_step, attempt)
        with self._lock:
            self._metrics.append(rec)

    def evaluation(self, rec: dict) -> None:
        with self._lock:
            self._evals.append(rec)

    def drain(self) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
        """(step records, evaluations) since the last drain."""
        with self._lock:
            out = tuple(self._metrics), tuple(self._evals)
            self._metrics.clear()
            self._evals = []
        return out

    def clear(self) -> None:
        self.drain()
