"""The supervisor: start the worker group, follow what the Watch sees, act on the policy's
decisions, and journal all of it.

Contract: `Supervisor(spec, rundir, journal, parts, records).run()` (`records`: the journal so far,
as the launcher read it) drives a new (or resumed) run from PENDING to SUCCEEDED, FAILED or STOPPED
and returns the folded status. It acts; what it acts on is kept by collaborators with their own
state: the run's book (`book.RunBook`: state, step, restarts, recoveries; every state change goes
through its `to()`, which checks the table and journals the cause), the fleet (`fleet.Fleet`: nodes,
spares, node health, cordons, leases) and the sizing (`sizing.Sizing`: each attempt's size, resizes,
the survivors kept). Every fault, anomaly, decision, restore, rollback, cordon and checkpoint is
journalled before it is acted on. Decisions are the policy's (`policy.judge`, `policy.decide`);
chaos gets in only through `parts.chaos`. What it needs to go on is rebuilt from the journal, so a
resumed supervisor behaves like the one that died. A stop request wins over the last step: a group
that ends while the job stops ends it STOPPED, its step persisted. Before this supervisor sees a
step trained, a stop ends the run at once (there is nothing to save), and an error after a stop
signal ends it STOPPED (the signal may have broken what failed). A crash, error or silent
rank, or a lost node's ranks, are replaced alone, the survivors kept.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

from resilient.agents.group import GroupStartError
from resilient.agents.reservation import ranks_of
from resilient.checkpoint.source import RestoreSource
from resilient.config import JobSpec
from resilient.errors import Abort
from resilient.heap import Trimmer
from resilient.rundir import RunDir
from resilient.rundir.layout import FINAL
from resilient.runlog.journal import Journal, JournalLost, read_records
from resilient.runlog.ranklogs import RankLogs, log_url
from resilient.runlog.status import fold
from resilient.supervisor import policy
from resilient.supervisor.book import RunBook
from resilient.supervisor.budget import Budget
from resilient.supervisor.faults import (
    NODE_FAULTS,
    Action,
    Fault,
    FaultKind,
    PendingRecovery,
    PendingRollback,
)
from resilient.supervisor.fleet import Fleet
from resilient.supervisor.hang_limits import HangLimits
from resilient.supervisor.hooks import JobView
from resilient.supervisor.intake import Intake
from resilient.supervisor.nodes import PreflightFailed
from resilient.supervisor.parts import Parts
from resilient.supervisor.restore import RestoreImpossible, abandon_after, find_restore_point
from resilient.supervisor.sizing import GROW_PLACE_S, Sizing
from resilient.supervisor.state import TERMINAL, JobState
from resilient.supervisor.watch import Watch

log = logging.getLogger(__name__)


class Supervisor:
    def __init__(
        self,
        spec: JobSpec,
        rundir: RunDir,
        journal: Journal,
        parts: Parts,
        records: list[dict],
        on_progress: Callable[[dict], None] | None = None,
    ):
        self.spec, self.rundir, self.journal, self.parts = spec, rundir, journal, parts
        self.nodes, self.chaos = parts.nodes, parts.chaos
        self.clock = parts.clock
        self.intake = Intake(journal, parts.monitor, parts.nodes, RankLogs(rundir))
        self.intake.learn(records)
        self.book = book = RunBook(spec, journal, parts.control, records, on_progress, parts.clock)
        self.budget = Budget(spec.supervisor, records)
        self.group = None  # the current attempt's group
        cordoned = {c["node"]: c["reason"] for c in book.status_at_start["cordoned_nodes"]}
        writers = max(
            (r.get("generation", 0) for r in records if r["type"] == "nodes_lost"), default=0
        )
        groups = lambda: (self.group, self.sizing.kept)  # noqa: E731
        self.fleet = Fleet(spec, parts, journal, cordoned, groups, writers)
        self.sizing = Sizing(spec, book, self.fleet, parts)
        learnt = [r for r in records if r["type"] == "hang_limits"]
        self.heap = Trimmer()  # freed memory back to the system once a minute: flat RSS
        self.hang_limits = HangLimits(spec.supervisor, learnt[-1] if learnt else None)
        # (kind, node) -> faults so far: a node's second straggler or sdc fault cordons it
        self.offences = Counter(
            (r["kind"], r["node"]) for r in records if r["type"] == "fault" and r.get("node")
        )

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.book.state != JobState.PENDING:
            state = self.book.state.value
            raise RuntimeError(f"the journal says {state}; only a new or resumed run is supervised")
        # A resumed run starts over from PENDING too (its journal's `resume` record says so) and
        # restores from the newest persisted checkpoint: memory tiers died with the old driver.
        self.parts.control.end_at_once_while(self.book.nothing_to_save, self.book.end_now)
        try:
            if self.parts.control.stop_reason:  # it came while the launch was getting ready
                raise Abort(f"{self.parts.control.stop_reason} before the job started")
            self.book.to(JobState.PREFLIGHT, "job accepted")
            self._preflight()
            while self.book.state not in TERMINAL:
                self._attempt()
        except Abort as e:  # a second signal, the stop's grace ran out, a stop before the start
            self.book.abort(e.reason)
        except Exception as e:
            if self.book.state in TERMINAL or isinstance(e, JournalLost):  # (nowhere to say it)
                raise
            if not self.parts.control.signalled:  # a bug: the journal still says how it ended
                self.book.to(JobState.FAILED, f"internal error: {type(e).__name__}: {e}"[:500])
                raise
            # what the stop's signal broke (it can end a Ray cluster the user started too)
            stop = self.parts.control.stop_reason
            log.warning("%s while stopping on %s", type(e).__name__, stop, exc_info=True)
            self.book.abort(f"{stop}; stopping met {type(e).__name__}: {e}"[:500])
        finally:
            self._close()
        return self._final_status()

    def _preflight(self) -> None:
        """Agents up and able to use storage on every node, workers warm: STARTING, else FAILED
        with the node that cannot do its part (no restart mends that)."""
        try:
            self.journal.append("nodes", nodes=self.fleet.start())
        except PreflightFailed as e:
            return self.book.to(JobState.FAILED, f"preflight: {e}")
        self.fleet.preflight(self.chaos.preflight(self.nodes))
        self.fleet.warm(self.sizing.world)
        self.book.to(JobState.STARTING, "preflight passed: node agents up")

    def _final_status(self) -> dict:
        try:
            return fold(read_records(self.rundir))
        except Exception:  # storage went away at the very end: what this supervisor knows
            known = {
                "state": self.book.state.value,
                "step": self.book.step,
                "restarts": self.book.restarts,
            }
            return self.book.status_at_start | known

    def _close(self) -> None:
        self.sizing.drop_kept()
        try:  # a lost journal (JournalLost) does not keep the agents and spares from ending
            self.intake.close()
        finally:
            self.fleet.close()
            self.parts.control.close()
            self.journal.flush(timeout=self.spec.checkpoint.persist_timeout)

    def _attempt(self) -> None:
        try:
            source = self._prepare_attempt()
        except RestoreImpossible as e:
            self.book.to(JobState.FAILED, str(e))
            return
        self.book.restored = restored = source.step if source else 0
        self.nodes.protect({restored} if source else set())
        before = self.sizing.world
        world = self.sizing.size()
        if world is None:  # failed or stopped while waiting for capacity
            return
        placement = self.fleet.placement(world, GROW_PLACE_S if world > before else None)
        if placement is None and world > before:  # a grow Ray could not place: go on as before
            placement, world = self.sizing.grow_failed(before), before
        if placement is None:
            self.book.to(
                JobState.FAILED,
                f"Ray did not place {world} rank(s) within supervisor.start_timeout="
                f"{self.spec.supervisor.start_timeout:g}s (cordoned: "
                f"{sorted(self.fleet.cordoned) or 'none'}); add nodes or lower "
                "cluster.num_workers, then `resilient launch --resume RUN_DIR`",
            )
            return
        self.group = group = self.sizing.group_for(placement)
        self.book.data_steps = {}
        outcome: Fault | str | None = None
        try:
            outcome = self._start(group, source, restored) or self._follow(group, restored)
            self._conclude(outcome, group)
        finally:
            if group is not self.sizing.kept:  # "done"/"stopped"/"paused": the ranks finished
                group.shutdown(force=not isinstance(outcome, str))
            self.group = None

    def _prepare_attempt(self) -> RestoreSource | None:
        """Find the state to restore (before the anomaly, for a rollback) and journal it."""
        rollback, self.book.pending_rollback = self.book.pending_rollback, None
        source = self._restore_point(rollback.rollback_to if rollback else None)
        restored = source.step if source else 0
        if rollback:
            self.book.skip = sorted(set(self.book.skip) | set(rollback.skip_batches))
            why = {
                "from_step": rollback.from_step,
                "skipped_batches": list(rollback.skip_batches),
                "reason": rollback.reason,
            }
            abandon_after(restored, self.nodes, self.intake, self.parts.store, self.journal, why)
        self.book.pending_recoveries = [
            replace(p, restored_step=restored) for p in self.book.pending_recoveries
        ]
        return source

    def _restore_point(self, at_most: int | None) -> RestoreSource | None:
        persisted = self.intake.newest_persisted(at_most)
        return find_restore_point(
            self.nodes,
            self.parts.store,
            self.spec.fingerprint(),
            at_most,
            persisted,
            self.journal,
            self.spec.supervisor.start_timeout,
            on_wait=self._waiting,
            exclude=frozenset(self.intake.abandoned),
        )

    def _waiting(self, note: str) -> None:
        self.book.check_grace()  # a preempted job does not wait on storage past its grace
        self.book.emit(note=note)

    def _start(self, group, source: RestoreSource | None, restored: int) -> Fault | None:
        try:
            group.start(source, self.chaos.plan(restored, group.size), self.book.skip)
        except GroupStartError as e:
            kind = FaultKind.CRASH if e.dead else FaultKind.START_TIMEOUT
            return Fault(kind, e.rank, restored + 1, self.clock(), str(e))
        self.journal.append("ranks", ranks=ranks_of(group))
        self.fleet.refill()
        return None

    def _follow(self, group, restored: int) -> Fault | str:
        """Poll until the group ends ("done" or "stopped") or a fault must be acted on."""
        cfg = self.spec.supervisor
        watch = Watch(group, restored, group.size, cfg, self.clock, self.hang_limits)
        while True:
            self.heap.maybe()
            seen = watch.poll()
            limits = self.hang_limits.changed()
            if limits:
                self.journal.append("hang_limits", **limits)
            if self.book.state in (JobState.RUNNING, JobState.STOPPING):
                self.book.training_s += seen.trained_s
            self._check_stop(group)
            # what arrived with this poll is recorded first, whatever happens next
            self._record(seen.fresh)
            events = self.intake.events(list(seen.metrics))
            if seen.fault and seen.fault.kind == FaultKind.CRASH:  # the rest of the poll too
                return self._anomalies(events, group, self.fleet.explain(seen.fault, group))
            lost = self.fleet.check(group, seen.now, self.book.step + 1)
            if lost:  # a node that answers nothing: before its silence is taken for a hang
                return self.chaos.attribute(lost)
            at = (self.book.step, self.book.training_s, watch.running, seen.latest)
            self.chaos.tick(JobView(*at, group, self.nodes, self.parts.store))
            fault = self._anomalies(events, group)
            if fault:
                return fault
            if seen.ready:
                self.book.ready(seen.ready, restored)
            if seen.step is not None:
                self.book.progressed(seen)
            self.sizing.check_size(group)
            if seen.fault:  # a hang of a node that went silent whole is the node's
                return self.chaos.attribute(self.fleet.explain(seen.fault, group))
            if seen.ended:
                return seen.ended

    def _check_stop(self, group) -> None:
        reason = self.parts.control.stop_reason
        if reason and self.book.state != JobState.STOPPING:
            self.book.stop_reason = reason
            group.request_stop()
            self.book.to(JobState.STOPPING, f"stop requested: {reason}")
        self.book.check_grace()

    def _conclude(self, outcome: Fault | str, group) -> None:
        if isinstance(outcome, Fault):
            self._handle(outcome, group)
            return
        if outcome == "paused":
            self.sizing.paused()  # RESIZING, or STOPPED if a stop came in meanwhile
            return
        if outcome == "done":
            self.journal.append("final", path=self.rundir.url(FINAL), step=self.book.step)
        if self.book.state == JobState.STOPPING or outcome == "stopped":
            if self.book.state != JobState.STOPPING:  # ranks that stopped on their own: say so
                self.book.to(JobState.STOPPING, "every rank stopped")
            self.book.to(
                JobState.STOPPED,
                f"stopped at step {self.book.step} on {self.book.stop_reason}; its state is "
                "persisted",
            )
            return
        done = self.intake.early_stop or f"all {self.spec.train.steps} steps done"
        self.book.to(JobState.SUCCEEDED, f"{done}; final adapter written")

    # -- acting on a fault -------------------------------------------------------------------------
    def _handle(self, fault: Fault, group) -> None:
        stopping = self.book.state == JobState.STOPPING
        if not stopping:
            self.book.to(JobState.DIAGNOSING, policy.describe(fault))
        where = {} if fault.rank is None else {"log": log_url(self.rundir, fault.rank)}
        self.journal.append("fault", **fault.to_record(), **where)
        idx, self.book.fault_index = self.book.fault_index, self.book.fault_index + 1
        history = self.budget.history(self.book.step - self.book.restored, stopping, time.time())
        kind = fault.anomaly or fault.kind.value
        others = [n for n in self.nodes.order if n != fault.node and n not in self.fleet.excluded()]
        history = replace(
            history,
            node_offences=self.offences[kind, fault.node],
            other_nodes=len(others),
            on_cordoned=bool(set(group.placement) & self.fleet.cordoned.keys()),
            stop_signal=self.parts.control.stop_reason if self.parts.control.signalled else None,
        )
        if fault.node:
            self.offences[kind, fault.node] += 1
        decision = policy.decide(fault, history, self.spec.supervisor)
        self.journal.append("decision", fault_index=idx, **decision.to_record())
        if decision.action == Action.GIVE_UP:
            self.book.to(JobState.FAILED, decision.reason)
            return
        if decision.action == Action.STOP:
            return self.book.abort(decision.reason)
        for node in decision.exclude_nodes:
            self.fleet.cordon(node, decision.reason)
        if fault.kind in NODE_FAULTS:  # before the teardown: no flush or lookup goes there
            self.fleet.lose(fault.node)
            group.write_off(fault.node, fault.evidence)
        rollback = decision.action == Action.ROLLBACK
        if rollback:
            self.book.pending_rollback = PendingRollback(
                fault.step, decision.rollback_to, decision.skip_batches, decision.reason
            )
        self.book.to(JobState.ROLLING_BACK if rollback else JobState.RESTARTING, decision.reason)
        keep = decision.keep_survivors  # a restart, or a rollback the survivors load
        self.sizing.resize_cause = policy.describe(fault)  # if the next attempt has another size
        counts = self.budget.restarted(fault, time.time())
        self._teardown(group, idx, decision.delay_s, counts, fault if keep else None, rollback)
        self.book.pending_recoveries.append(PendingRecovery(idx, fault))
        self.book.to(JobState.STARTING, f"restart {self.book.restarts}")

    def _teardown(
        self, group, idx: int, delay_s: float, counts: dict, keep: Fault | None, rollback: bool
    ) -> None:
        """Save what the survivors did and hold (their newest snapshot goes to memory first), then
        end the group, or (`keep`: the fault that keeps survivors) only the ranks it replaces."""
        t0 = time.time()
        last = group.final_heartbeats()
        self._record(last.values())
        flushed = group.flush_newest(last)
        if flushed and flushed.step is not None:
            self.journal.append(
                "checkpoint",
                rank=flushed.rank,
                tier="memory",
                step=flushed.step,
                bytes=flushed.bytes,
                handoff_s=flushed.seconds,
                flush=True,
                fault_index=idx,
            )
        self.intake.keep([m for h in last.values() for m in h.metrics])
        if keep is not None:
            self.sizing.keep(group, keep, rollback)
        else:
            group.shutdown()
        self.book.restarts += 1
        self.journal.append("restart", n=self.book.restarts, fault_index=idx, **counts)
        if delay_s:
            time.sleep(delay_s)
        self.journal.append("teardown", fault_index=idx, seconds=time.time() - t0)

    # -- what the watch saw ------------------------------------------------------------------------
    def _record(self, heartbeats) -> None:
        self.book.trained(self.intake.heartbeats(heartbeats))

    def _anomalies(self, events: list, group, death: Fault | None = None) -> Fault | None:
        """Journal every anomaly event with what the policy made of it; the fault to act on
        (`policy.acted_on`: after a `death`, maybe the XID that came with it), the nodes the
        poll's other faults would cordon cordoned too, so one restart avoids them all."""
        found = []
        for e in events:
            v = policy.judge(e, group.placement, self.book.data_steps, self.book.step, self.clock())
            if v.cordon:
                self.fleet.cordon(*v.cordon)
            self.intake.anomaly(e, v.decision)
            found += [v.fault] if v.fault else []
        fault = policy.acted_on(found, death)
        for node, reason in policy.also_cordon(fault, found).items() if fault else ():
            self.fleet.cordon(node, reason)
        return self.chaos.attribute(fault) if fault else None
