"""Watch: one attempt's observer. It polls the worker group and says what it saw; it acts on
nothing.

Contract: `Watch(group, restored, world, cfg, clock).poll()` waits up to one TICK for heartbeats
and returns a `Seen`: the heartbeats that arrived, the training time since the previous poll, and
what they add up to: the group became ready (every rank training: each said so, or one finished a
step of this life, which every rank's collective is part of), the job-wide step advanced, the
group ended ("done", "stopped", or "paused" for a resize), or a fault. Faults, in order of
precedence: a rank's death (CRASH, within one tick), a rank's training error (ERROR, after a
short grace, since a dead peer shows up in survivors as collective errors first; the rank that
failed first is blamed), a rank silent for the silence limit (HANG; before
its first answer, `start_timeout`), a group not training `start_timeout` after it was started
although its ranks answer (START_TIMEOUT: stuck in rendezvous, loading or restoring), no step
finished for the no-step limit while any rank trains and none has failed (HANG, blaming a rank that
went silent while its peers answer, if one did; a rank evaluating or verifying is progress).
The limits are `HangLimits`' (`supervisor.hang_timeout`, or learnt from the job's pace with
"auto"); the Watch feeds it what it sees. A step's time is when its slowest rank finished it, on
this clock (the rank's own report, not the heartbeat's arrival). Only the supervisor changes state.
Time the supervisor itself was away (two polls more than `AWAY_S` beyond a tick apart: its process
stopped, starved or swapped out) counts toward no limit: every clock the limits run on (silences,
the no-step clock, the start and error clocks) skips it, so a supervisor that comes back blames no
rank for what it did not watch, and a rank that hung meanwhile is found once the limit has passed
in time watched.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

from resilient.agents.heartbeat import AWAY_S, Heartbeat
from resilient.config import SupervisorConfig
from resilient.supervisor.faults import Fault, FaultKind
from resilient.supervisor.hang_limits import HangLimits

TICK = 0.1  # seconds between polls: bounds crash-detection latency, costs ~nothing
ERROR_GRACE = 2.0  # seconds an error waits for a peer's death to explain it
STEP_TIMES = 10_000  # the newest per-rank step times the attempt's median is taken over

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ready:
    """Every rank trains: how long the slowest restore took and when the last rank began (of
    those that had said so: a rank whose answer is still to come is known to train by a peer's
    finished step, not by when it began)."""

    restore_s: float
    ready_at: float


@dataclass(frozen=True)
class Seen:
    now: float
    latest: Mapping[int, Heartbeat]  # each rank's newest heartbeat
    fresh: tuple[Heartbeat, ...] = ()  # the heartbeats that arrived in this poll
    trained_s: float = 0.0  # training time since the previous poll (0 until the group is ready)
    ready: Ready | None = None  # the group has just become ready
    step: int | None = None  # the step every rank finished, when it advanced or the group ended
    ended: str | None = None  # "done" | "stopped" | "paused": every rank ended (never with a fault)
    fault: Fault | None = None
    median_step_s: float | None = None  # with `ended`: this attempt's median step time
    metrics: tuple[dict, ...] = field(default=())  # the per-step records of `fresh`, in order


class Watch:
    def __init__(
        self,
        group,
        restored: int,
        world: int,
        cfg: SupervisorConfig,
        clock: Callable[[], float] = time.time,
        limits: HangLimits | None = None,
    ):
        """`limits`: the job's hang limits, kept across attempts (a new one: learnt afresh)."""
        self.group, self.restored, self.world, self.cfg, self.clock = (
            group,
            restored,
            world,
            cfg,
            clock,
        )
        self.limits = limits or HangLimits(cfg)
        self.limits.new_attempt()
        self._answered: dict[int, float] = {}
        self.last_step = restored
        self.started = self.last_poll = self.last_progress = clock()
        self.running = False
        self.error_since: float | None = None
        self.step_times: deque[float] = deque(maxlen=STEP_TIMES)

    def poll(self) -> Seen:
        asked = self.clock()
        fresh = tuple(self.group.poll(TICK))
        now = self.clock()
        self._excuse(now - self.last_poll - TICK, asked)
        trained = now - self.last_poll if self.running else 0.0
        self.last_poll = now
        metrics = tuple(m for hb in fresh for m in hb.metrics)
        self.step_times.extend(m["step_time"] + m["data_wait"] for m in metrics)
        latest = dict(self.group.latest)
        ready = self._ready(now, latest)  # first: the steps that made it ready are its pace
        self._learn(fresh, metrics)
        fault = (
            self._dead(now)
            or self._corrupt(now, latest)
            or self._erred(now, latest)
            or self._silent(now, latest)
            or self._slow_start(now, latest)
        )
        step, ended = self._advance(now, latest)
        if fault is None and ended is None:
            fault = self._stalled(now, latest)
        median = statistics.median(self.step_times) if ended and self.step_times else None
        return Seen(
            now,
            latest,
            fresh,
            trained,
            ready,
            step,
            None if fault else ended,
            fault,
            median,
            metrics,
        )

    def _excuse(self, away: float, asked: float) -> None:
        """The supervisor was away `away` seconds before `asked` (when it asked this poll): every
        limit's clock that ran then moves on by as much (an answer of this poll came after)."""
        if away <= AWAY_S:
            return
        log.warning(
            "the supervisor was away for %.1fs (its process stopped or starved): no limit counts "
            "that time",
            away,
        )
        self.started += away
        self.last_progress += away
        if self.error_since is not None:
            self.error_since += away
        for clocks in (self.group.last_answer, self._answered):  # the group's: read by the limits
            for rank, at in clocks.items():
                if at <= asked:
                    clocks[rank] = at + away

    def _learn(self, fresh: tuple[Heartbeat, ...], metrics: tuple[dict, ...]) -> None:
        """Feed the limits the pace of a running group (a start or a restore says nothing of it)."""
        if not self.running:
            return
        self.limits.observe_steps(metrics)
        for hb in fresh:
            at = self.group.last_answer.get(hb.rank)
            before = self._answered.get(hb.rank)
            if at is not None and before is not None and at > before:
                self.limits.observe_answer(at - before)
            if at is not None:
                self._answered[hb.rank] = at

    def _fault(self, kind: FaultKind, rank: int | None, evidence: str, now: float) -> Fault:
        node = self.group.node_of(rank) if rank is not None else None
        return Fault(kind, rank, self.last_step + 1, now, evidence, node=node)

    def _dead(self, now: float) -> Fault | None:
        if not self.group.dead:
            return None
        rank = min(self.group.dead)
        return self._fault(FaultKind.CRASH, rank, self.group.dead[rank], now)

    def _corrupt(self, now: float, latest: Mapping[int, Heartbeat]) -> Fault | None:
        """Replicas that disagreed (every rank has the same report: the first one will do)."""
        report = next((h.sdc for h in latest.values() if h.phase == "sdc" and h.sdc), None)
        if report is None:
            return None
        rank = report.get("rank")
        audit = bool(report.get("failed_audits"))
        if audit:
            what = (
                f"the work of rank {rank} did not reproduce on another rank"
                if rank is not None
                else "a compute audit failed and no rank could be named"
            )
        else:
            odd = report.get("odd") or []
            what = f"replica digests differ (odd: rank {odd})" if odd else "replica digests differ"
        fault = self._fault(
            FaultKind.SDC,
            rank,
            f"step {report['step']}: {what}; {json.dumps(report, sort_keys=True)}"[:900],
            now,
        )
        return replace(
            fault,
            step=report["step"],
            suggested="cordon" if audit and rank is not None else "replace",
            rollback_to=report.get("rollback_to"),
        )

    def _erred(self, now: float, latest: Mapping[int, Heartbeat]) -> Fault | None:
        errors = {r: h.error for r, h in latest.items() if h.phase == "error"}
        if not errors:
            return None
        self.error_since = self.error_since or now
        if now - self.error_since <= ERROR_GRACE:
            return None
        # The first rank to fail is the cause: a failed rank leaves the process group, which breaks
        # the collectives of the others a moment later.
        rank = min(errors, key=lambda r: (self._our_time(latest[r], latest[r].error_at), r))
        fault = self._fault(FaultKind.ERROR, rank, errors[rank] or "", now)
        # the same error on every rank before any trained: the next start would meet it again
        firsts = {(e or "").split("\n", 1)[0] for e in errors.values()}
        same = not self.running and len(errors) == self.world and len(firsts) == 1
        return replace(fault, everywhere=same)

    def _our_time(self, hb: Heartbeat, t: float | None) -> float:
        """A rank's timestamp `t` on this clock (its clock may be skewed): the heartbeat's age at
        `t`, from when the heartbeat arrived here."""
        if t is None:
            return float("inf")
        return self.group.last_answer.get(hb.rank, hb.now) - (hb.now - t)

    def _silent(self, now: float, latest: Mapping[int, Heartbeat]) -> Fault | None:
        # The heartbeat is answered by its own thread in every phase, so once a rank has answered,
        # silence means the process is stuck; before that it may still be starting.
        answered = self.limits.silence_s  # read once: every rank, every poll
        if not self.running:  # starting: restores, loads, imports
            answered = max(answered, self.limits.unlearnt_s)
        pending = self.group.pending
        for rank, seen in self.group.last_answer.items():
            limit = answered if rank in latest else self.cfg.start_timeout
            if rank in pending and now - seen > limit:
                phase = latest[rank].phase if rank in latest else "created"
                return self._fault(
                    FaultKind.HANG,
                    rank,
                    f"rank {rank} answered no heartbeat for {now - seen:.1f}s (phase {phase})",
                    now,
                )
        return None

    def _slow_start(self, now: float, latest: Mapping[int, Heartbeat]) -> Fault | None:
        # Ranks that answer in "rendezvous", "loading" or "restoring" are not silent, yet a step
        # that blocks there (a peer that never joins, a read that never ends) must end somewhere.
        if self.running or now - self.started <= self.cfg.start_timeout:
            return None
        behind = sorted(r for r in range(self.world) if r not in latest or not latest[r].past_start)
        if not behind:
            return None
        rank = behind[0]
        phase = latest[rank].phase if rank in latest else "created"
        return self._fault(
            FaultKind.START_TIMEOUT,
            rank,
            f"rank {rank} still in phase {phase} {now - self.started:.1f}s after the start "
            f"(supervisor.start_timeout={self.cfg.start_timeout:g}s)",
            now,
        )

    def _ready(self, now: float, latest: Mapping[int, Heartbeat]) -> Ready | None:
        """The group trains: every rank said so, or one finished a step of this life, which every
        rank's collective is part of (a peer that hangs before its answer says so must meet the
        training limits, not the start's)."""
        if self.running or len(latest) < self.world:
            return None
        started = [h for h in latest.values() if h.past_start]
        stepped = any(h.step > self.restored for h in started)
        if len(started) < self.world and not stepped:
            return None
        self.running, self.last_progress = True, now
        return Ready(
            max(h.restore_s for h in started),
            max(h.training_at or now for h in started),
        )

    def _advance(
        self, now: float, latest: Mapping[int, Heartbeat]
    ) -> tuple[int | None, str | None]:
        if len(latest) < self.world:
            return None, None
        phases = [h.phase for h in latest.values()]
        ended = None
        if all(p == "done" for p in phases):
            ended = "done"
        elif all(p in ("stopped", "done") for p in phases):
            ended = "stopped"
        elif all(p == "paused" for p in phases):
            ended = "paused"
        step = min(h.step for h in latest.values())
        if step <= self.last_step and not ended:
            return None, None
        if step > self.last_step:
            self.last_progress = self._done_at(step, latest, now)
        self.last_step = max(step, self.last_step)
        return self.last_step, ended

    def _done_at(self, step: int, latest: Mapping[int, Heartbeat], now: float) -> float:
        """When (on this clock) the slowest rank finished `step`: from its own report, so the
        no-step limit runs from the step, not from the heartbeat that brought the news."""
        slowest = [h for h in latest.values() if h.step == step and h.step_done_at is not None]
        if not slowest:
            return now
        return min(now, max(self._our_time(h, h.step_done_at) for h in slowest))

    def _stalled(self, now: float, latest: Mapping[int, Heartbeat]) -> Fault | None:
        # any rank, not every: a rank left training while its peers finished is stuck all the same;
        # a rank's error is the error path's (its peers wait in a collective meanwhile)
        phases = [h.phase for h in latest.values()]
        if "evaluating" in phases or "verifying" in phases:
            # an evaluation, a recomputation of disagreeing replicas: progress, and the next
            # step gets a full limit
            self.last_progress = now
            return None
        busy = "training" in phases or "pausing" in phases
        training = len(latest) == self.world and busy and "error" not in phases
        # a resize's pause hands a snapshot over: room for that, as for a start; and for an
        # attempt's first, warming steps
        limit = self.limits.stall_s
        if "pausing" in phases or (self.limits.auto and not self.limits.settled):
            limit = max(limit, self.limits.unlearnt_s)
        if self.running and training and now - self.last_progress > limit:
            quiet = self._quietest(now)
            return self._fault(
                FaultKind.HANG,
                quiet,
                f"no rank finished a step for {now - self.last_progress:.1f}s (limit {limit:.1f}s)"
                + (
                    f"; rank {quiet} answered no heartbeat for "
                    f"{now - self.group.last_answer[quiet]:.1f}s"
                    if quiet is not None
                    else ""
                ),
                now,
            )
        return None

    def _quietest(self, now: float) -> int | None:
        """The rank silent for more than 1.5 heartbeat intervals while every other rank answered
        within one: the stalled job's cause (its peers wait for it in a collective)."""
        interval = self.cfg.heartbeat_interval
        ages = {r: now - t for r, t in self.group.last_answer.items() if r not in self.group.dead}
        silent = [r for r, a in ages.items() if a > 1.5 * interval]
        if len(silent) != 1 or len(ages) < 2:
            return None
        others = [a for r, a in ages.items() if r != silent[0]]
        return silent[0] if max(others, default=0.0) <= interval + 0.5 else None
