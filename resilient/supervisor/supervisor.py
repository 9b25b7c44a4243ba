"""The supervisor: start the worker group, follow what the Watch sees, act on the policy's
decisions, and journal all of it.

Contract: `Supervisor(spec, rundir, journal, parts, records).run()` (`records`: the journal so far,
as the launcher read it) drives a new (or resumed) run from
PENDING to SUCCEEDED, FAILED or STOPPED and returns the folded status. It is the only one that
changes the job's state: every change goes through `state.transition()` and is journalled with
its cause; every fault, anomaly, decision, restore, rollback, cordon and checkpoint is journalled
before it is acted on. Decisions are the policy's (`policy.judge`, `policy.decide`); chaos gets in
only through `parts.chaos`. What it needs to go on (restarts, cordoned nodes, skipped batches) is
rebuilt from the journal, so a resumed supervisor behaves like the one that died. A stop request
wins over the last step: a group that ends while the job stops ends it STOPPED, its step persisted.
Elastic (`resizing.Resizing`): each attempt runs as many ranks as fit (between `min_workers` and
the target); a crash, error or silent rank replaces only that rank, the survivors kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

from resilient.agents.group import GroupStartError, ranks_of
from resilient.checkpoint.source import RestoreSource
from resilient.config import JobSpec
from resilient.errors import Abort
from resilient.rundir import RunDir
from resilient.rundir.layout import FINAL
from resilient.runlog.journal import Journal, read_records
from resilient.runlog.ranklogs import RankLogs, log_url
from resilient.runlog.status import fold
from resilient.supervisor import policy
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
from resilient.supervisor.hooks import JobView
from resilient.supervisor.intake import Intake
from resilient.supervisor.parts import Parts
from resilient.supervisor.progress import Progress
from resilient.supervisor.resizing import GROW_PLACE_S, Resizing
from resilient.supervisor.restore import RestoreImpossible, find_restore_point
from resilient.supervisor.state import TERMINAL, JobState, transition
from resilient.supervisor.watch import Watch

DATA_STEPS_KEPT = 10_000  # steps whose data steps are remembered (rollbacks look back a few)


class Supervisor(Resizing, Progress):
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
        self.on_progress = on_progress or (lambda s: None)
        self.records_at_start = records
        self.intake.learn(records)
        status = fold(records)
        self.state = JobState(status["state"])
        self.restarts = status["restarts"]
        self.budget = Budget(spec.supervisor, records)
        self.restored = status["step"]  # the step the current attempt restored
        self.fault_index = len(status["faults"])
        self.skip = sorted({b for r in status["rollbacks"] for b in r["skipped_batches"]})
        self.pending_recoveries: list[PendingRecovery] = []  # faults acted on, not recovered
        self.pending_rollback: PendingRollback | None = None
        self.step = status["step"]
        # seconds spent training (every rank stepping), over every attempt and life of the run
        self.training_s = max(
            (r.get("training_s", 0.0) for r in records if r["type"] == "progress"), default=0.0
        )
        self.data_steps: dict[int, set[int]] = {}  # step -> data steps trained (rollback skips)
        self.stop_reason: str | None = None
        self._last_progress_journal = 0.0
        self.world = spec.cluster.num_workers  # ranks of the current (or next) group
        self.kept = None  # a group whose survivors go on in the next attempt
        self._kept_generation = 0
        self._last_size_check = 0.0
        self.resize_cause: str | None = None  # why the next attempt may have another size
        self.group = None  # the current attempt's group
        cordoned = {c["node"]: c["reason"] for c in status["cordoned_nodes"]}
        self.fleet = Fleet(spec, parts, journal, cordoned, lambda: (self.group, self.kept))

    # -- bookkeeping -------------------------------------------------------------------------------
    def _to(self, new: JobState, cause: str) -> None:
        old, self.state = self.state, transition(self.state, new)
        self.journal.append("transition", **{"from": old.value, "to": new.value, "cause": cause})
        self._emit()

    def _emit(self, **extra) -> None:
        total, restarts = self.spec.train.steps, self.restarts
        self.on_progress(
            dict(state=self.state.value, step=self.step, total=total, restarts=restarts, **extra)
        )

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.state != JobState.PENDING:
            raise RuntimeError(
                f"the journal says {self.state.value}; only a new or resumed run can be supervised"
            )
        # A resumed run starts over from PENDING too (its journal's `resume` record says so) and
        # restores from the newest persisted checkpoint: memory tiers died with the old driver.
        self._to(JobState.PREFLIGHT, "job accepted")
        try:
            self.journal.append("nodes", nodes=self.fleet.start())
            self.fleet.warm(self.world)
            self._to(JobState.STARTING, "preflight passed: node agents up")
            while self.state not in TERMINAL:
                self._attempt()
        except Abort as e:  # a second signal, or the stop's grace ran out: end now, consistently
            self._abort(e.reason)
        except Exception as e:  # a bug here: the journal still says how the run ended
            if self.state not in TERMINAL:
                self._to(JobState.FAILED, f"internal error: {type(e).__name__}: {e}"[:500])
            raise
        finally:
            self._close()
        try:
            return fold(read_records(self.rundir))
        except Exception:  # storage went away at the very end: what this supervisor knows
            return fold(self.records_at_start) | {
                "state": self.state.value,
                "step": self.step,
                "restarts": self.restarts,
            }

    def _close(self) -> None:
        if self.kept is not None:  # survivors kept for an attempt that never came
            self.kept.shutdown()
            self.kept = None
        self.intake.close()
        self.fleet.close()
        self.parts.control.close()
        self.journal.flush(timeout=self.spec.checkpoint.persist_timeout)

    def _attempt(self) -> None:
        try:
            source = self._prepare_attempt()
        except RestoreImpossible as e:
            self._to(JobState.FAILED, str(e))
            return
        self.restored = restored = source.step if source else 0
        self.nodes.protect({restored} if source else set())
        before = self.world
        world = self._size()
        if world is None:  # failed or stopped while waiting for capacity
            return
        placement = self.fleet.placement(world, GROW_PLACE_S if world > before else None)
        if placement is None and world > before:  # a grow Ray could not place: go on as before
            placement, world = self._grow_failed(before), before
        if placement is None:
            self._to(
                JobState.FAILED,
                f"Ray did not place {world} rank(s) within supervisor.start_timeout="
                f"{self.spec.supervisor.start_timeout:g}s (cordoned: "
                f"{sorted(self.fleet.cordoned) or 'none'}); add nodes or lower "
                "cluster.num_workers, then `resilient launch --resume RUN_DIR`",
            )
            return
        self.group = group = self._group_for(placement)
        self.data_steps = {}
        outcome: Fault | str | None = None
        try:
            outcome = self._start(group, source, restored) or self._follow(group, restored)
            self._conclude(outcome, group)
        finally:
            if group is not self.kept:  # "done"/"stopped"/"paused": the ranks finished
                group.shutdown(force=not isinstance(outcome, str))
            self.group = None

    def _prepare_attempt(self) -> RestoreSource | None:
        """Find the state to restore (before the anomaly, for a rollback) and journal it."""
        rollback, self.pending_rollback = self.pending_rollback, None
        source = self._restore_point(rollback.rollback_to if rollback else None)
        restored = source.step if source else 0
        if rollback:
            self.skip = sorted(set(self.skip) | set(rollback.skip_batches))
            self.journal.append(
                "rollback",
                from_step=rollback.from_step,
                to_step=restored,
                skipped_batches=list(rollback.skip_batches),
                reason=rollback.reason,
            )
        self.pending_recoveries = [
            replace(p, restored_step=restored) for p in self.pending_recoveries
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
        )

    def _waiting(self, note: str) -> None:
        self._check_grace()  # a preempted job does not wait on storage past its grace
        self._emit(note=note)

    def _start(self, group, source: RestoreSource | None, restored: int) -> Fault | None:
        try:
            group.start(source, self.chaos.plan(), self.skip)
        except GroupStartError as e:
            kind = FaultKind.CRASH if e.dead else FaultKind.START_TIMEOUT
            return Fault(kind, e.rank, restored + 1, self.clock(), str(e))
        self.journal.append("ranks", ranks=ranks_of(group))
        self.fleet.refill()
        return None

    def _follow(self, group, restored: int) -> Fault | str:
        """Poll until the group ends ("done" or "stopped") or a fault must be acted on."""
        watch = Watch(group, restored, group.size, self.spec.supervisor, self.clock)
        while True:
            seen = watch.poll()
            if self.state in (JobState.RUNNING, JobState.STOPPING):
                self.training_s += seen.trained_s
            self._check_stop(group)
            # what arrived with this poll is recorded first, whatever happens next
            self._record(seen.fresh)
            events = self.intake.events(list(seen.metrics))
            if seen.fault and seen.fault.kind == FaultKind.CRASH:  # a death explains the rest
                return self.chaos.attribute(self.fleet.explain(seen.fault, group))
            lost = self.fleet.check(group, seen.now, self.step + 1)
            if lost:  # a node that answers nothing: before its silence is taken for a hang
                return self.chaos.attribute(lost)
            at = (self.step, self.training_s, watch.running, seen.latest)
            self.chaos.tick(JobView(*at, group, self.nodes, self.parts.store))
            anomaly = self._anomalies(events, group)
            if anomaly:
                return anomaly
            if seen.ready:
                self._ready(seen.ready, restored)
            if seen.step is not None:
                self._progress(seen)
            self._check_size(group)
            if seen.fault:
                return self.chaos.attribute(seen.fault)
            if seen.ended:
                return seen.ended

    def _check_stop(self, group) -> None:
        reason = self.parts.control.stop_reason
        if reason and self.state != JobState.STOPPING:
            self.stop_reason = reason
            group.request_stop()
            self._to(JobState.STOPPING, f"stop requested: {reason}")
        self._check_grace()

    def _check_grace(self) -> None:
        deadline = self.parts.control.stop_deadline
        if deadline is not None and time.time() > deadline:
            raise Abort(
                f"{self.stop_reason or 'stop'}: the grace of supervisor.grace_s="
                f"{self.spec.supervisor.grace_s:g}s ran out"
            )

    def _abort(self, reason: str) -> None:
        """End the run now: STOPPED, saying that the step it stopped at may not be persisted."""
        if self.state in TERMINAL:
            return
        if self.state != JobState.STOPPING:
            self._to(JobState.STOPPING, f"stop requested: {reason}")
        self._to(
            JobState.STOPPED,
            f"{reason}; the newest persisted checkpoint is kept: "
            "`resilient launch --resume RUN_DIR` goes on from it",
        )

    def _conclude(self, outcome: Fault | str, group) -> None:
        if isinstance(outcome, Fault):
            self._handle(outcome, group)
            return
        if outcome == "paused":
            self._paused()  # RESIZING, or STOPPED if a stop came in meanwhile
            return
        if outcome == "done":
            self.journal.append("final", path=self.rundir.url(FINAL), step=self.step)
        if self.state == JobState.STOPPING or outcome == "stopped":
            if self.state != JobState.STOPPING:  # ranks that stopped on their own: say so first
                self._to(JobState.STOPPING, "every rank stopped")
            self._to(
                JobState.STOPPED,
                f"stopped at step {self.step} on {self.stop_reason}; its state is persisted",
            )
            return
        self._to(
            JobState.SUCCEEDED, f"all {self.spec.train.steps} steps done; final adapter written"
        )

    # -- acting on a fault -------------------------------------------------------------------------
    def _handle(self, fault: Fault, group) -> None:
        stopping = self.state == JobState.STOPPING
        if not stopping:
            self._to(JobState.DIAGNOSING, policy.describe(fault))
        log = {} if fault.rank is None else {"log": log_url(self.rundir, fault.rank)}
        self.journal.append("fault", **fault.to_record(), **log)
        idx, self.fault_index = self.fault_index, self.fault_index + 1
        history = self.budget.history(self.step - self.restored, stopping, time.time())
        decision = policy.decide(fault, history, self.spec.supervisor)
        self.journal.append("decision", fault_index=idx, **decision.to_record())
        if decision.action == Action.GIVE_UP:
            self._to(JobState.FAILED, decision.reason)
            return
        for node in decision.exclude_nodes:
            self.fleet.cordon(node, decision.reason)
        if fault.kind in NODE_FAULTS:  # before the teardown: no flush or lookup goes there
            self.fleet.lose(fault.node)
            group.write_off(fault.node, fault.evidence)
        rollback = decision.action == Action.ROLLBACK
        if rollback:
            self.pending_rollback = PendingRollback(
                fault.step, decision.rollback_to, decision.skip_batches, decision.reason
            )
        self._to(JobState.ROLLING_BACK if rollback else JobState.RESTARTING, decision.reason)
        keep = decision.action == Action.RESTART and decision.keep_survivors
        self.resize_cause = policy.describe(fault)  # if the next attempt has another size
        counts = self.budget.restarted(fault, time.time())
        self._teardown(group, idx, decision.delay_s, counts, fault if keep else None)
        self.pending_recoveries.append(PendingRecovery(idx, fault))
        self._to(JobState.STARTING, f"restart {self.restarts}")

    def _teardown(self, group, idx: int, delay_s: float, counts: dict, keep: Fault | None) -> None:
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
                handoff_s=flushed.seconds,
                flush=True,
                fault_index=idx,
            )
        self.intake.keep([m for h in last.values() for m in h.metrics])
        if keep is not None:
            self._keep(group, keep)
        else:
            group.shutdown()
        self.restarts += 1
        self.journal.append("restart", n=self.restarts, fault_index=idx, **counts)
        if delay_s:
            time.sleep(delay_s)
        self.journal.append("teardown", fault_index=idx, seconds=time.time() - t0)

    # -- what the watch saw ------------------------------------------------------------------------
    def _record(self, heartbeats) -> None:
        for step, data_step in self.intake.heartbeats(heartbeats):
            self.data_steps.setdefault(step, set()).add(data_step)
            self.data_steps.pop(step - DATA_STEPS_KEPT, None)  # a rollback looks back a few steps

    def _anomalies(self, events: list, group) -> Fault | None:
        """Journal every anomaly event with what the policy made of it; the first fault to act on
        (None: training goes on)."""
        found = None
        for e in events:
            v = policy.judge(e, group.placement, self.data_steps, self.step, self.clock())
            if v.cordon:
                self.fleet.cordon(*v.cordon)
            self.intake.anomaly(e, v.decision)
            found = found or (self.chaos.attribute(v.fault) if v.fault else None)
        return found
