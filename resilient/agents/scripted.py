"""A worker group without Ray or processes, for tests and benchmarks of what watches a group.

Contract: `ScriptedGroup` has the interface of `WorkerGroup` that the supervisor and the Watch use
(start, poll, latest, dead, pending, last_answer, final_heartbeats, flush_newest, request_stop,
request_pause, replace, leave, inject, release_chaos, shutdown, placement, size, node_of); a group
whose ranks were replaced starts again (survivors keep their pids). Its ranks take one step every
`Scenario.step_s` seconds of a `FakeClock`, which only `poll(wait_s)` moves, so a test runs an hour
of a job in milliseconds and gets the same answer every time. A `Scenario` (shared by the groups
of one job, like the real run directory) says which fault strikes at which step, once: `crash`
(the rank dies), `hang` (it stops answering, as SIGSTOP does), `error` (its step raises), `nan`
(its loss is NaN; no rank applies the step), `stall` (every rank answers, none finishes a step: a
deadlocked collective), `slow` (the rank computes `slow_factor` times slower until its group
starts again, and every rank waits for it in the all-reduce: a straggler), `node_loss` (every rank
on the node dies; `lost` names the node, for a prober that finds its raylet gone; they start again
on a `standby` node), `xid` (its node's GPU reports an XID, in the samples `take_samples()` hands
to a fake node inventory). It keeps the steps snapshotted and when each fault struck (`struck`).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from resilient.agents.group import Handoff
from resilient.agents.heartbeat import Heartbeat


class FakeClock:
    """Seconds that pass only when told to."""

    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


@dataclass
class Scenario:
    """What happens to a job's ranks, by step (each fault strikes once per job)."""

    step_s: float = 0.2  # seconds per step
    start_s: float = 0.2  # seconds from start() to training (rendezvous, restore)
    persist_s: float = 0.1  # rank 0's final persist (phase "persisting")
    every: int = 1  # a snapshot every this many steps
    heartbeat_s: float = 0.1  # how often a rank is asked (and answers, unless hung)
    crash: dict[int, int] = field(default_factory=dict)  # step -> rank
    hang: dict[int, int] = field(default_factory=dict)
    error: dict[int, int] = field(default_factory=dict)
    nan: dict[int, int] = field(default_factory=dict)
    stall: dict[int, int] = field(default_factory=dict)
    slow: dict[int, int] = field(default_factory=dict)
    slow_factor: float = 4.0
    node_loss: dict[int, str] = field(default_factory=dict)  # step -> node
    lost: set[str] = field(default_factory=set)  # nodes whose processes are gone
    standby: list[str] = field(default_factory=list)  # where a lost node's ranks start again
    xid: dict[int, tuple[str, int]] = field(default_factory=dict)  # step -> (node, xid)
    struck: dict[tuple[str, int], float] = field(default_factory=dict)  # (kind, step) -> when
    snapshots: set[int] = field(default_factory=set)
    taken: list[int] = field(default_factory=list)  # the snapshots, in the order they were taken
    ordered: list[int] = field(default_factory=list)  # the snapshots, sorted
    samples: list[tuple[str, dict]] = field(default_factory=list)  # (node, sample) for the nodes
    data: list[tuple[int, int]] = field(default_factory=list)  # (step, data step) trained, in order
    starts: list[tuple[int, int]] = field(default_factory=list)  # (attempt, world) of each start

    def strikes(self, kind: str, step: int, t: float) -> int | None:
        """The rank `kind` strikes at `step` (once, at time `t`), or None."""
        rank = getattr(self, kind).get(step)
        if rank is None or (kind, step) in self.struck:
            return None
        self.struck[(kind, step)] = t
        return rank

    def snap(self, step: int) -> None:
        """A snapshot of `step` is in memory (`snapshots`; `taken`: new ones, in order)."""
        if step not in self.snapshots:
            self.snapshots.add(step)
            self.taken.append(step)
            bisect.insort(self.ordered, step)

    def newest(self, at_most: int) -> int | None:
        """The newest snapshot of a step up to `at_most`."""
        i = bisect.bisect_right(self.ordered, at_most)
        return self.ordered[i - 1] if i else None

    def take_samples(self) -> list[tuple[str, dict]]:
        out, self.samples = self.samples, []
        return out


class ScriptedGroup:
    def __init__(
        self,
        scenario: Scenario,
        placement: list[str],
        total: int,
        clock: FakeClock,
        attempt: int = 0,
    ):
        self.sc, self.placement, self.total, self.clock = scenario, list(placement), total, clock
        self.attempt = attempt
        self.pids = {r: 1000 + r for r in range(self.size)}  # a replaced rank gets a new one
        self._new_life()

    def _new_life(self) -> None:
        """What a (re)start begins afresh; survivors keep only their pids."""
        self.pending: dict[int, bool] = {}
        self.issued_at: dict[int, float] = {}
        self.last_answer: dict[int, float] = {}
        self.latest: dict[int, Heartbeat] = {}
        self.dead: dict[int, str] = {}
        self.phase = {r: "created" for r in range(self.size)}
        self.hung: set[int] = set()
        self.step = self.data_step = 0
        self.halted = self.stop = self.pause = False
        self.skip: set[int] = set()
        self._metrics: dict[int, list[dict]] = {r: [] for r in range(self.size)}
        self._checkpoints: list[dict] = []
        self.persist_until: float | None = None
        self.slowed: dict[int, float] = {}  # rank -> its compute's slowdown in this life
        self.step_done_at: float | None = None
        self.first_done_at: float | None = None

    @property
    def size(self) -> int:
        return len(self.placement)

    def node_of(self, rank: int) -> str:
        return self.placement[rank]

    @property
    def infos(self) -> list[dict]:
        """Where each rank runs, as `WorkerGroup.infos` says it (for `ranks_of`)."""
        return [{"pid": self.pids.get(r), "node_id": n} for r, n in enumerate(self.placement)]

    def start(self, restore, plan, skip: list[int]) -> None:
        for r, node in enumerate(self.placement):  # a kept group's ranks of a lost node
            if node in self.sc.lost:
                live = [n for n in self.sc.standby + self.placement if n not in self.sc.lost]
                self.placement[r] = live[0]
        self._new_life()
        self.sc.starts.append((self.attempt, self.size))
        for r in range(self.size):
            self.pids.setdefault(r, 1000 + r + 100 * len(self.sc.starts))
        self.step = restore.step if restore else 0
        self.data_step = self._data_step_of(self.step)
        self.restored, self.skip = self.step, set(skip)
        now = self.clock()
        self.next_step_at = now + self.sc.start_s + self.sc.step_s
        self.training_at = now + self.sc.start_s
        for r in range(self.size):
            self.last_answer[r] = now

    def _data_step_of(self, step: int) -> int:
        return max((d for s, d in self.sc.data if s == step), default=step)

    # -- the ranks -------------------------------------------------------------------------------
    def _run(self, now: float) -> None:
        if now >= self.training_at and all(p == "created" for p in self.phase.values()):
            self.phase = {r: "training" for r in range(self.size)}
        while not self.halted and self.phase[0] == "training" and self.next_step_at <= now:
            self._one_step(self.next_step_at)
            self.next_step_at += self.sc.step_s * max(self.slowed.values(), default=1.0)
        if self.persist_until is not None and now >= self.persist_until:
            self.persist_until = None
            self.phase[0] = "done" if self.step == self.total else "stopped"

    def _one_step(self, t: float) -> None:
        s = self.step + 1
        if self._strike(s, t):
            return
        data = self.data_step + 1
        while data in self.skip:
            data += 1
        nan = self.sc.strikes("nan", s, t)
        slow = self.sc.strikes("slow", s, t)
        if slow is not None:
            self.slowed[slow] = self.sc.slow_factor
        pace = self.sc.step_s * max(self.slowed.values(), default=1.0)
        for r in range(self.size):
            loss = float("nan") if r == nan else 2.0 - s * 1e-3
            self._metrics[r].append(
                {
                    "t": t,
                    "rank": r,
                    "step": s,
                    "data_step": data,
                    "loss": loss,
                    "mean_loss": loss,
                    "grad_norm": 1.0,
                    "step_time": pace,
                    "compute_s": self.sc.step_s / 2 * self.slowed.get(r, 1.0),
                    "data_wait": 0.0,
                    "attempt": self.attempt,
                    "tokens_per_s": 1000.0,
                }
            )
        if nan is not None:  # no rank applies the update
            self.phase = {r: "nonfinite" for r in range(self.size)}
            self.halted = True
            return
        self.sc.data.append((s, data))
        self.step, self.data_step, self.step_done_at = s, data, t
        self.first_done_at = self.first_done_at or t
        final = s == self.total or self.stop
        if self.pause and not final:  # a resize: this step's snapshot, then every rank waits
            self.sc.snap(s)
            self.phase = {r: "paused" for r in range(self.size)}
            return
        if s % self.sc.every == 0 or final:
            self.sc.snap(s)
            self._checkpoints.append({"step": s, "blocking_s": 0.0, "persist": final})
        if final:
            self.phase = {r: "done" if s == self.total else "stopped" for r in range(self.size)}
            self.phase[0] = "persisting"
            self.persist_until = t + self.sc.persist_s

    def _strike(self, s: int, t: float) -> bool:
        """A crash, hang, error or stall at step `s`: the other ranks wait in the collective."""
        if s in self.sc.xid and self.sc.strikes("xid", s, t) is not None:  # first: a GPU's XID
            node, code = self.sc.xid[s]  # comes with the death of the process that used it
            self.sc.samples.append((node, {"gpus": [{"gpu": 0, "t": t, "xid": code}]}))
        for kind in ("crash", "hang", "error", "stall"):
            rank = self.sc.strikes(kind, s, t)
            if rank is None:
                continue
            self.halted = True
            if kind == "crash":
                self.dead[rank] = f"the worker process of rank {rank} is gone"
            elif kind == "hang":
                self.hung.add(rank)
            elif kind == "error":
                self.phase[rank] = "error"
            return True
        node = self.sc.strikes("node_loss", s, t)
        if node is not None:
            self.sc.lost.add(node)
            on = [r for r in range(self.size) if self.node_of(r) == node]
            self.write_off(node, f"the worker process's node {node} is gone")
            if on:  # a node without ranks of this group takes none of its steps with it
                self.halted = True
                return True
        return False

    def _heartbeat(self, r: int, now: float) -> Heartbeat:
        metrics, self._metrics[r] = tuple(self._metrics[r]), []
        ckpts = ()
        if r == 0:
            ckpts, self._checkpoints = tuple(self._checkpoints), []
        training = self.phase[r] != "created"
        return Heartbeat(
            rank=r,
            pid=self.pids[r],
            phase=self.phase[r],
            now=now,
            step=self.step,
            error="RuntimeError: scripted" if self.phase[r] == "error" else None,
            metrics=metrics,
            checkpoints=ckpts,
            snapshot_step=self._newest_snapshot(),
            training_at=self.training_at if training else None,
            step_done_at=self.step_done_at,
            first_step_done_at=self.first_done_at,
            mean_loss=2.0,
            tokens_per_s=1000.0,
        )

    # -- the WorkerGroup interface ---------------------------------------------------------------
    def poll(self, wait_s: float) -> list[Heartbeat]:
        self.clock.advance(wait_s)
        now = self.clock()
        self._run(now)
        fresh = []
        for r in range(self.size):
            if r in self.dead or now - self.issued_at.get(r, -1e9) < self.sc.heartbeat_s:
                continue
            self.issued_at[r] = now
            if r in self.hung:
                self.pending[r] = True
                continue
            self.latest[r] = hb = self._heartbeat(r, now)
            self.last_answer[r] = now
            fresh.append(hb)
        return fresh

    def final_heartbeats(self) -> dict[int, Heartbeat]:
        now = self.clock()
        return {
            r: self._heartbeat(r, now)
            for r in range(self.size)
            if r not in self.dead and r not in self.hung
        }

    def _newest_snapshot(self) -> int | None:
        return self.sc.newest(self.step)

    def flush_newest(self, answers: dict[int, Heartbeat]) -> Handoff | None:
        """A survivor's newest snapshot is already in `Scenario.snapshots` (the memory tier)."""
        step = self._newest_snapshot()
        return Handoff(min(answers), step, 0.0) if answers and step is not None else None

    def request_stop(self) -> None:
        self.stop = True

    def request_pause(self) -> None:
        self.pause = True

    def replace(self, ranks) -> None:
        for r in ranks:
            self.pids.pop(r, None)
            self.slowed.pop(r, None)

    def write_off(self, node: str, why: str) -> None:
        for r in range(self.size):
            if self.node_of(r) == node:
                self.dead.setdefault(r, why)

    def leave(self, timeout: float, drain: bool = False) -> dict[int, str]:
        return {}

    def inject(self, rank: int, fault: str, params: dict, fatal: bool = False) -> None:
        raise NotImplementedError("a scripted group takes its faults from its Scenario")

    def release_chaos(self) -> None:
        pass

    def shutdown(self, force: bool = True) -> None:
        self.halted = True
