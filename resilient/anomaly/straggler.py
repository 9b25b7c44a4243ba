"""The straggler detector: a rank persistently slower than its peers at the same steps.

Contract: as every detector (`anomaly.detectors`): deterministic in what it was fed, thresholds
from `AnomalyConfig`; `observe(t, rank, step, compute_s, attempt)` returns new events. A step is
judged once every rank reported it: sorted once, each rank's peers' median by bisection
(`median_without`), so a step costs O(n log n) in ranks, not O(n^2).
"""

from __future__ import annotations

import bisect
import statistics
from collections import defaultdict, deque

from resilient.anomaly.events import REPLACE, WARN, AnomalyEvent
from resilient.config import AnomalyConfig

WARMUP_STEPS = 20  # steps after a (re)start the straggler detector does not judge


def median_without(ordered: list[float], x: float) -> float:
    """The median of sorted `ordered` with one value equal to `x` left out."""
    i = bisect.bisect_left(ordered, x)
    m = len(ordered) - 1

    def at(k: int) -> float:
        return ordered[k] if k < i else ordered[k + 1]

    return (at((m - 1) // 2) + at(m // 2)) / 2


class StragglerDetector:
    """A rank whose compute time stays above its peers' median by `straggler_factor` over a
    confirmation window: the median, over the last `straggler_window` steps, of its per-step
    ratio to the median of its peers (a median, so one noisy step neither makes nor breaks a
    streak). Comparing with peers at the same step makes a job-wide slowdown invisible by
    construction; the rank must also be slower than its own healthy history, so a rank that was
    always a little slower is not flagged on noise, and it must have stayed slow for
    `straggler_window_s` seconds too (at 20 ms steps a window of steps is a blip: a restart's
    spare warming beside it). A new attempt (a restart) starts its windows afresh, after
    WARMUP_STEPS steps: a promoted spare's first steps, and a replacement warming beside them,
    are slower for reasons that pass (the first group's workers all warmed before its first
    step). It fires once, and again only after a whole calm window."""

    def __init__(self, cfg: AnomalyConfig, world: int):
        self.cfg, self.world = cfg, world
        self.steps: dict[int, dict[int, float]] = defaultdict(dict)
        self.ratios: dict[int, deque] = defaultdict(lambda: deque(maxlen=cfg.straggler_window))
        self.history: dict[int, deque] = defaultdict(lambda: deque(maxlen=200))
        self.flagged: set[int] = set()
        self.slow_since: dict[int, float] = {}  # when each rank's window first turned slow
        self.attempt, self.since = 0, 0  # the group's attempt and the step it started after

    def observe(
        self, t: float, rank: int, step: int, compute_s: float, attempt: int = 0
    ) -> list[AnomalyEvent]:
        if attempt != self.attempt:  # a new group: its first steps say nothing of its speed
            self.attempt, self.since = attempt, step
            self.steps.clear()
            self.ratios.clear()
            self.slow_since.clear()
            self.flagged.clear()  # a rank of the new group may straggle again and must be seen
        if self.attempt and step <= self.since + WARMUP_STEPS:
            return []
        row = self.steps[step]
        row[rank] = compute_s
        if len(row) < self.world or self.world < 2:
            return []
        del self.steps[step]
        for old in [s for s in self.steps if s < step - 50]:
            del self.steps[old]
        ev = []
        ordered = sorted(row.values())  # once per step: each rank's peers' median is O(log n)
        for r, x in row.items():
            peers = median_without(ordered, x)
            ratio = x / peers if peers > 0 else 1.0
            window = self.ratios[r]
            window.append(ratio)
            if len(window) < window.maxlen:
                continue
            typical = statistics.median(window)
            slow = typical > self.cfg.straggler_factor and x >= self.cfg.straggler_min_s
            own = 0.0
            if slow:  # its own history, only where it matters (a median of 200, per rank)
                own = statistics.median(self.history[r]) if len(self.history[r]) >= 5 else 0.0
                slow = x > own
            if ratio <= self.cfg.straggler_factor:
                self.history[r].append(x)
            since = self.slow_since.setdefault(r, t) if slow else self.slow_since.pop(r, None)
            lasting = slow and t - since >= self.cfg.straggler_window_s
            if lasting and r not in self.flagged:
                self.flagged.add(r)
                ev.append(
                    AnomalyEvent(
                        t,
                        "straggler",
                        "warning",
                        REPLACE if self.cfg.straggler_action == "replace" else WARN,
                        rank=r,
                        step=step,
                        evidence={
                            "compute_s": round(x, 5),
                            "peers_median_s": round(peers, 5),
                            "ratio": round(typical, 3),
                            "own_median_s": round(own, 5),
                            "window": self.cfg.straggler_window,
                        },
                    )
                )
            elif max(window) <= self.cfg.straggler_factor:
                self.flagged.discard(r)
        return ev
