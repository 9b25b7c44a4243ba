"""HangLimits: how long a rank may stay silent, and the job without a finished step, before it is
hung; learnt from what the job itself does when `supervisor.hang_timeout = "auto"`.

Contract: `observe_steps(records)` takes the ranks' per-step records (their `t`, on the rank's own
clock, so gaps are free of clock skew), `observe_answer(rank, gap)` the time between two heartbeat
answers of one rank. `silence_s` and `stall_s` are the limits now; `changed()` says (once) when they
moved by more than a quarter since last reported, for the journal (`hang_limits`). With a number
for `hang_timeout`, both are that number and nothing is learnt.

Why these limits. A heartbeat is asked every `heartbeat_interval`, so a live rank's answers are an
interval apart plus its reply latency; a silence is declared past one interval plus the larger of
another interval and 5x the longest excess latency seen (NVIDIA's resiliency extension: 5x the
longest observed interval, kept across restarts). Progress is known through the same heartbeats,
so the no-step limit is one interval (the news may be that old) plus the larger of an interval and
5x the longest gap between two steps seen (persists, evaluations and audits are in those gaps).
Until `WARM` gaps have been seen, the limits stay at `UNLEARNT_S`: the first steps of a job
(compilation, caches) say nothing about the later ones, and the first `SETTLE` gaps of each rank
in each attempt are not learnt from at all (they would lift the limit for the whole run), and
until every reporting rank is past them (`settled`) the Watch allows `UNLEARNT_S` for a step.
Windows are bounded (`WindowMax`): O(1) memory over weeks, a slow phase long past ages out, and
the limits cost O(1) to read (the Watch reads them for every rank on every poll).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from resilient.config import SupervisorConfig

UNLEARNT_S = 10.0  # both limits until the job's own pace is known
WARM = 20  # step gaps seen before the limits follow them
WINDOW = 2000  # the newest gaps (steps, answers) the longest is taken over
FACTOR = 5.0  # the longest observed gap, times this
SETTLE = 3  # a rank's first gaps in an attempt: warming up, not its pace


class WindowMax:
    """The newest `n` values' maximum, O(1) amortised per value: a deque of (index, value) whose
    values fall from the front, each older one dropped once a newer one at least as large came."""

    def __init__(self, n: int):
        self.n, self.i = n, 0
        self.q: deque[tuple[int, float]] = deque()

    def append(self, x: float) -> None:
        while self.q and self.q[-1][1] <= x:
            self.q.pop()
        self.q.append((self.i, x))
        self.i += 1
        if self.q[0][0] < self.i - self.n:  # one value leaves the window per value that enters
            self.q.popleft()

    def max(self, default: float = 0.0) -> float:
        return self.q[0][1] if self.q else default

    def __len__(self) -> int:
        return min(self.i, self.n)


class HangLimits:
    def __init__(self, cfg: SupervisorConfig, learnt: dict | None = None):
        """`learnt`: the newest `hang_limits` journal record (a resumed supervisor starts there)."""
        self.cfg = cfg
        self.auto = cfg.hang_timeout == "auto"
        self.interval = cfg.heartbeat_interval
        self.step_gaps = WindowMax(WINDOW)
        self.answer_excess = WindowMax(WINDOW)
        self._last_t: dict[int, float] = {}
        self._seen: dict[int, int] = {}  # gaps seen per rank this attempt
        self._reported: tuple[float, float] | None = None
        self._carried = learnt if self.auto and learnt else None

    @property
    def unlearnt_s(self) -> float:
        """The limit where the pace says nothing (a group starting, a resize's pause)."""
        return UNLEARNT_S if self.auto else float(self.cfg.hang_timeout)

    @property
    def learnt(self) -> bool:
        return len(self.step_gaps) >= WARM or self._carried is not None

    def new_attempt(self) -> None:
        """A new group: its first step follows a restore, not the previous step."""
        self._last_t = {}
        self._seen = {}

    @property
    def settled(self) -> bool:
        """Every rank that reported in this attempt is past its first SETTLE gaps."""
        return bool(self._seen) and min(self._seen.values()) > SETTLE

    def observe_steps(self, records: Iterable[dict]) -> None:
        if not self.auto:
            return
        for r in records:
            last = self._last_t.get(r["rank"])
            self._last_t[r["rank"]] = r["t"]
            if last is None or r["t"] < last:
                continue
            seen = self._seen[r["rank"]] = self._seen.get(r["rank"], 0) + 1
            if seen > SETTLE:
                self.step_gaps.append(r["t"] - last)

    def observe_answer(self, gap: float) -> None:
        if self.auto:
            self.answer_excess.append(max(0.0, gap - self.interval))

    @property
    def silence_s(self) -> float:
        if not self.auto:
            return float(self.cfg.hang_timeout)
        if not self.learnt:
            return UNLEARNT_S
        excess = self.answer_excess.max()
        if self._carried and len(self.answer_excess) < WARM:
            return self._carried["silence_s"]
        return self._cap(self.interval + max(self.interval, FACTOR * excess))

    @property
    def stall_s(self) -> float:
        if not self.auto:
            return float(self.cfg.hang_timeout)
        if len(self.step_gaps) < WARM:
            return self._carried["stall_s"] if self._carried else UNLEARNT_S
        return self._cap(self.interval + max(self.interval, FACTOR * self.step_gaps.max()))

    def _cap(self, limit: float) -> float:
        # a collective times out on its own past collective_timeout: no later than that
        return min(limit, self.cfg.collective_timeout * 0.9)

    def changed(self) -> dict | None:
        """The limits as a journal record's fields when they moved by more than a quarter (or
        were first learnt) since the last report; None otherwise."""
        if not self.auto or len(self.step_gaps) < WARM:
            return None
        now = (round(self.silence_s, 3), round(self.stall_s, 3))
        old = self._reported
        if old is not None and all(abs(n - o) <= 0.25 * o for n, o in zip(now, old, strict=True)):
            return None
        self._reported = now
        return {
            "silence_s": now[0],
            "stall_s": now[1],
            "longest_step_gap_s": round(self.step_gaps.max(), 4),
            "longest_answer_excess_s": round(self.answer_excess.max(), 4),
            "steps_seen": len(self.step_gaps),
        }
