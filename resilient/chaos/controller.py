"""The chaos controller: every fault a job is asked to suffer, carried out at the supervisor's
named points (see `supervisor.hooks`).

Contract: `ChaosController(spec, rundir, journal, control)` is a `ChaosHooks`.
- `plan(restored, size)`: for an attempt that resumes after step `restored` with `size` ranks,
  the `[[chaos]]` entries with `at_step` that have not fired (by their markers): the workers fire
  their own at the start of that step; a job-wide one (storage, checkpoints, the supervisor) is
  carried out here while rank 0 holds the job at that step.
- `tick(view)`: GPU faults on nodes where no rank runs (at their step); the job-wide fault rank 0
  holds for; and, about once a second while the group trains, `at_time` entries that are due
  (training time: the clock stops while the job restarts, so random chaos models faults per hour of
  training and one fault never lands in the previous one's recovery) and `resilient chaos inject`
  requests. Each is recorded (marker, `chaos` journal record) before it strikes; one that cannot
  hit its target is journalled as `chaos_refused` and training goes on, as is a planned one whose
  step the job passed while its rank was not in the job (a shrunk job): seen at a poll, or at
  `plan(restored, size)` when a new attempt starts past it (a shrunk job that passed the step and
  grew back between two ticks).
- `attribute(fault)`: the fault with the injection time (and step) of the chaos that caused it,
  matched among the markers written since the attempt started (`attribute_to`, pure).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

from resilient.catalogue import GPU, PlannedFault
from resilient.chaos import inject
from resilient.chaos.schedule import draws
from resilient.config import ChaosEntry, JobSpec
from resilient.rundir import RunDir, markers
from resilient.rundir.markers import FiredFault, planned_key, random_key, request_key
from resilient.runlog.journal import Journal
from resilient.supervisor.faults import Fault, FaultKind
from resilient.supervisor.hooks import JobView

TICK_S = 1.0  # timed chaos and requests are looked at about this often
EXPLAINS = {  # which injected faults show up as which kind of fault
    FaultKind.CRASH: ("kill", "exit", "node_loss"),
    FaultKind.HANG: ("hang",),
    FaultKind.ERROR: ("gpu_xid", "gpu_lost", "ecc", "node_loss", "kill", "exit"),
    FaultKind.NODE_LOSS: ("node_loss", "kill", "exit"),
    FaultKind.PARTITION: ("node_loss", "hang"),
    FaultKind.SDC: ("bitflip", "bad_compute"),
}


def attribute_to(fault: Fault, fired: list[FiredFault]) -> Fault:
    """`fault` with the injection time, step and marker key of what caused it among `fired` (this
    attempt's markers, in key order): for a death, hang or error, the last one aimed at its rank
    (any, when the fault names no rank), a fault of a kind that explains it first (a SIGSTOP
    explains a hang, not a death); for an anomaly of a rank or a NaN, the first one (a NaN keeps
    the step it was seen at)."""
    if fault.kind == FaultKind.ANOMALY:
        if not fired or not (fault.anomaly == "nan" or fault.rank is not None):
            return fault
        f = fired[0]
        step = fault.step if fault.anomaly in ("nan", "loss_spike") else (f.step or fault.step)
        return replace(fault, injected_at=f.injected_at, step=step, chaos_key=f.key)
    if fault.kind == FaultKind.SDC:  # found at a later check, maybe blaming another rank
        fired = [f for f in fired if f.fault in EXPLAINS[FaultKind.SDC]]
        if not fired:
            return fault
        f = fired[0]
        return replace(fault, injected_at=f.injected_at, chaos_key=f.key)
    match = [f for f in fired if fault.rank is None or f.rank == fault.rank]
    explaining = [f for f in match if f.fault in EXPLAINS.get(fault.kind, ())]
    if not (explaining or match):
        return fault
    f = (explaining or match)[-1]
    return replace(fault, injected_at=f.injected_at, step=f.step or fault.step, chaos_key=f.key)


def preflight_targets(plan, nodes) -> list[tuple[int, str]]:
    """(plan index, node id) of each `bad_compute` planned for step 1: the node `node` names (its
    place in `nodes.order`, as `chaos node = i` everywhere), else the node rank `rank`'s slot is
    on in `nodes`' reservation; entries whose node is not there are left out. One mapping for a
    launch and for `resilient preflight`."""
    placement = nodes.reservation.placement() if nodes.reservation else []
    out = []
    for i, c in enumerate(plan):
        if c.fault != "bad_compute" or c.at_step != 1:
            continue
        rank = c.rank or 0
        nid = nodes.node_at(c.node) if c.node is not None else None
        if c.node is None and rank < len(placement):
            nid = placement[rank]
        if nid is not None:
            out.append((i, nid))
    return out


class ChaosController:
    def __init__(self, spec: JobSpec, rundir: RunDir, journal: Journal, control=None):
        self.spec, self.rundir, self.journal, self.control = spec, rundir, journal, control
        self.done: set[str] = set()  # keys fired (or refused) in this life of the run
        self.mine: dict[str, FiredFault] = {}  # what is known to have fired, by marker key
        self.before: set[str] = set()  # keys that had fired when the attempt started
        self._last_tick = 0.0
        rnd = spec.chaos.random
        self._draws = (
            draws(rnd.mtbf_s, tuple(rnd.faults), rnd.seed, spec.cluster.num_workers)
            if rnd
            else iter(())
        )
        self._drawn = 0  # how many random faults were drawn so far
        self._next = next(self._draws, None)
        self._life_start: float | None = None  # training seconds when this life first trained
        # [first step, size, the last step a poll saw it finish] of each attempt of this life:
        # which size may have passed a step. One entry per attempt, never per step.
        self._attempts: list[list[int]] = []

    def _fired(self) -> dict[str, FiredFault]:
        """What fired: this controller's own, and the planned faults the workers fired (their
        markers, read for the entries of the spec not known to have fired yet: a cost bounded by
        the spec, never by the run's length)."""
        for i in range(len(self.spec.chaos.plan)):
            key = planned_key(i)
            if key in self.mine:
                continue
            try:
                found = markers.read(self.rundir, key)
            except Exception:  # storage outage: what is known still counts
                continue
            if found:
                self.mine[key] = found
        return dict(self.mine)

    def preflight(self, nodes) -> set[str]:
        """`bad_compute` entries planned for step 1: in place before the nodes are checked (a
        node by index, or the node `rank`'s slot is on); the node ids, each recorded."""
        bad = set()
        for i, nid in preflight_targets(self.spec.chaos.plan, nodes):
            if planned_key(i) in self.done:
                continue
            self.done.add(planned_key(i))
            c = self.spec.chaos.plan[i]
            self._record(
                FiredFault(
                    planned_key(i), c.fault, time.time(), step=1, rank=c.rank, node=nid, index=i
                )
            )
            bad.add(nid)
        return bad

    def plan(self, restored: int = 0, size: int | None = None) -> tuple[PlannedFault, ...]:
        """The planned faults an attempt that resumes after step `restored` with `size` ranks
        is to fire. One whose step an earlier attempt of this life passed without its rank, and
        that this attempt will not reach again, is refused first."""
        fired = self._fired()
        self.before = set(fired)
        self.done |= self.before
        if size is not None:
            self._passed_before(restored, fired)
            self._attempts.append([restored + 1, size, restored])
        return tuple(
            PlannedFault(
                i,
                c.at_step,
                c.fault,
                c.target_rank,
                c.node,
                c.params,
                fatal=c.fault in GPU and inject.is_fatal(c.fault, c.params),
            )
            for i, c in enumerate(self.spec.chaos.plan)
            if c.at_step is not None and planned_key(i) not in self.done
        )

    def attribute(self, fault: Fault) -> Fault:
        fired = self._fired()
        return attribute_to(fault, [fired[k] for k in sorted(fired) if k not in self.before])

    def tick(self, view: JobView) -> None:
        if view.running:
            # at every poll (the plan's length, no request unless one passed): an attempt seen
            # past a step without its rank has refused it by then, so the step a new attempt's
            # poll may still show (the last attempt's, until its first report) is never credited
            # to a size that did not pass it unseen
            self._passed_without_its_rank(view)
            if self._attempts:  # how far this attempt was seen to train
                self._attempts[-1][2] = max(self._attempts[-1][2], view.step)
        self._gpu_on_idle_nodes(view)
        self._held(view)
        now = time.time()
        if not view.running or now - self._last_tick < TICK_S:
            return
        self._last_tick = now
        for i, c in enumerate(self.spec.chaos.plan):
            if c.at_time is not None and view.training_s >= c.at_time:
                self._entry(view, i, c)
        self._random(view)
        for req in self._requests():
            order = inject.Order(
                request_key(req.id), req.fault, req.rank, req.node, req.params, request=req.id
            )
            self._carry_out(view, order)

    def _passed_before(self, restored: int, fired: dict[str, FiredFault]) -> None:
        """Refuse the planned faults at or before `restored` (no worker of the coming attempt
        reaches their step) that an attempt without their rank may have passed (it began before
        the step), unless one with their rank was seen past it (then its marker says, and may
        be out of reach: nothing is said). An attempt's end is not polled (the race this
        closes): one that began before the step counts as having passed it."""
        for i, c in enumerate(self.spec.chaos.plan):
            key = planned_key(i)
            if c.at_step is None or c.at_step > restored or c.node is not None:
                continue
            if key in self.done or key in fired:
                continue
            began = [(size, seen) for first, size, seen in self._attempts if first <= c.at_step]
            if any(size > c.target_rank and seen >= c.at_step for size, seen in began):
                continue
            without = [size for size, _ in began if size <= c.target_rank]
            if without:
                self._refuse_passed(i, c, without[-1])

    def _refuse_passed(self, i: int, c: ChaosEntry, size: int) -> None:
        self.done.add(planned_key(i))
        self.journal.append(
            "chaos_refused",
            key=planned_key(i),
            index=i,
            fault=c.fault,
            rank=c.target_rank,
            step=c.at_step,
            error=f"rank {c.target_rank} was not in the job at step {c.at_step} (it ran {size} "
            "rank(s) then)",
        )

    def _passed_without_its_rank(self, view: JobView) -> None:
        """Planned faults whose step the job passed while their rank was not in it (a shrunk
        job): refused in the journal, with the reason, so the drill's report says so; they do
        not fire later."""
        passed = [
            (i, c)
            for i, c in enumerate(self.spec.chaos.plan)
            if c.at_step is not None
            and c.node is None
            and planned_key(i) not in self.done
            and c.at_step <= view.step
            and c.target_rank >= view.group.size
        ]
        fired = self._fired() if passed else {}  # one read of the markers for all of them
        for i, c in passed:
            if planned_key(i) in fired:  # its rank fired it before the job shrank
                self.done.add(planned_key(i))
                continue
            self._refuse_passed(i, c, view.group.size)

    def _random(self, view: JobView) -> None:
        """Random faults that are due. Those that fell due while the run was down (a resumed
        life) are let go: random chaos models faults per hour of training, not a backlog."""
        if self._life_start is None:
            self._life_start = view.training_s
        while self._next is not None and self._next[0] <= view.training_s:
            at, fault, rank = self._next
            key = random_key(self._drawn)
            if key not in self.done and (at >= self._life_start or self._life_start == 0):
                self._carry_out(view, inject.Order(key, fault, rank))
            self._drawn += 1
            self._next = next(self._draws, None)

    def _requests(self) -> list:
        """`resilient chaos inject` requests, unless the job was launched without them allowed
        (then each is refused in the journal, so the CLI can say so)."""
        taken = self.control.take_injects() if self.control else []
        if self.spec.chaos.allow_inject:
            return taken
        for req in taken:
            self.journal.append(
                "chaos_refused",
                key=request_key(req.id),
                fault=req.fault,
                rank=req.rank,
                node=req.node,
                request=req.id,
                error="the job was launched without --allow-chaos (chaos.allow_inject = true)",
            )
        return []

    def _entry(self, view: JobView, i: int, c: ChaosEntry) -> None:
        if planned_key(i) not in self.done:
            order = inject.Order(planned_key(i), c.fault, c.rank, c.node, c.params, index=i)
            self._carry_out(view, order)

    def _gpu_on_idle_nodes(self, view: JobView) -> None:
        """A GPU fault aimed at a node where no rank runs (ranks fire their own) is set on that
        node's simulated GPU when the job reaches its step."""
        for i, c in enumerate(self.spec.chaos.plan):
            if (
                c.fault not in GPU
                or c.node is None
                or c.at_step is None
                or c.at_step > view.step + 1
            ):
                continue
            if view.nodes.node_at(c.node) not in view.group.placement:
                self._entry(view, i, c)

    def _held(self, view: JobView) -> None:
        """Rank 0 reached the step of a job-wide fault and waits: carry it out, then release it."""
        h0 = view.heartbeats.get(0)
        index = h0.chaos_request if h0 else None
        if index is None or planned_key(index) in self.done:
            return
        self._entry(view, index, self.spec.chaos.plan[index])
        view.group.release_chaos()

    def _carry_out(self, view: JobView, order: inject.Order) -> None:
        self.done.add(order.key)
        try:
            fired = inject.aim(view, order)
            self._record(fired)
        except Exception as e:  # a fault the job cannot suffer now: say so, keep training
            self.journal.append(
                "chaos_refused",
                key=order.key,
                index=order.index,
                fault=order.fault,
                rank=order.rank,
                node=order.node,
                step=view.step + 1,
                request=order.request,
                error=str(e),
            )
            return
        inject.strike(view, fired, order.params)

    def _record(self, fired: FiredFault) -> None:
        """Marker and journal first: a restarted group or resumed supervisor must not fire it
        again (for `supervisor_kill` the marker is required, since the driver dies next)."""
        self.mine[fired.key] = fired
        try:
            markers.write(self.rundir, fired)
        except Exception:
            if fired.fault == "supervisor_kill":
                raise
        self.journal.append("chaos", **asdict(fired))
        if fired.fault == "supervisor_kill":
            self.journal.flush(timeout=10.0)
