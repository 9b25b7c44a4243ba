"""The supervisor loop: start the worker group, watch it, turn what it sees into faults, act on the
policy's decisions, and journal all of it.

Contract: `Supervisor.run()` drives the job from PENDING (or from where its journal left off) to
SUCCEEDED, FAILED or STOPPED and returns the folded status. Every state change goes through
`state.transition()` and is journalled with its cause; every fault, decision, restore and checkpoint
is journalled before it is acted on. It holds no state the journal cannot rebuild.
"""
from __future__ import annotations

import time
from typing import Callable

from ray.util.placement_group import remove_placement_group

from resilient.agents.group import GroupStartError, WorkerGroup, make_placement_group
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import JobSpec
from resilient.rundir import RunDir
from resilient.supervisor import policy
from resilient.supervisor.faults import Action, Fault, FaultKind
from resilient.supervisor.journal import Journal, read_records
from resilient.supervisor.nodes import Nodes
from resilient.supervisor.state import TERMINAL, JobState, transition
from resilient.supervisor.status import fold

STOP_FILE = "control/stop"
TICK = 0.1  # seconds between polls: bounds crash-detection latency, costs ~nothing


class Supervisor:
    def __init__(self, spec: JobSpec, rundir: RunDir, journal: Journal, base_ref: str,
                 on_progress: Callable[[dict], None] | None = None):
        self.spec, self.rundir, self.journal, self.base_ref = spec, rundir, journal, base_ref
        self.store = CheckpointStore(rundir)
        self.nodes = Nodes()
        self.on_progress = on_progress or (lambda s: None)
        status = fold(read_records(rundir))
        self.state = JobState(status["state"])
        self.restarts = status["restarts"]
        self.fault_index = len(status["faults"])
        self.pending_recovery: tuple[int, Fault, int] | None = None  # (fault index, fault, restored step)
        self.step = status["step"]
        self._last_progress_journal = 0.0
        self._last_stop_check = 0.0

    # -- bookkeeping -------------------------------------------------------------------------------
    def _to(self, new: JobState, cause: str) -> None:
        old, self.state = self.state, transition(self.state, new)
        self.journal.append("transition", **{"from": old.value, "to": new.value, "cause": cause})
        self._emit()

    def _emit(self, **extra) -> None:
        self.on_progress({"state": self.state.value, "step": self.step, "total": self.spec.train.steps,
                          "restarts": self.restarts, **extra})

    def _fired(self) -> dict[int, dict]:
        out = {}
        try:
            for name in self.rundir.listdir("chaos"):
                if name.startswith("fired-") and name.endswith(".json"):
                    rec = self.rundir.read_json(f"chaos/{name}")
                    out[rec["index"]] = rec
        except Exception:  # storage outage: markers are best effort
            pass
        return out

    def _stop_requested(self) -> bool:
        now = time.time()
        if now - self._last_stop_check < 1.0:
            return False
        self._last_stop_check = now
        if self.journal.unflushed:
            self.journal.flush()
        try:
            return self.rundir.exists(STOP_FILE)
        except Exception:  # storage outage: ask again next time
            return False

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.state != JobState.PENDING:
            raise RuntimeError(f"the journal says {self.state.value}; only a new or resumed run can be supervised")
        # A resumed run starts over from PENDING too (its journal's `resume` record says so) and
        # restores from the newest persisted checkpoint: memory tiers died with the old driver.
        self._to(JobState.PREFLIGHT, "job accepted")
        self.journal.append("nodes", nodes=self.nodes.start(self.spec, self.rundir.uri))
        self._to(JobState.STARTING, "preflight passed: node agents up")
        pg = make_placement_group(self.spec, self.spec.supervisor.start_timeout)
        if pg is None:
            self._to(JobState.FAILED, "the cluster could not place the worker group; lower cluster.num_workers "
                                      "or cluster.resources_per_worker, or add nodes")
            return fold(read_records(self.rundir))
        try:
            while self.state not in TERMINAL:
                self._attempt(pg)
        finally:
            remove_placement_group(pg)
            self._journal_events(self.nodes.flush_events())
            self.nodes.shutdown()
            deadline = time.time() + self.spec.checkpoint.persist_timeout
            while not self.journal.flush() and time.time() < deadline:
                time.sleep(1.0)
        return fold(read_records(self.rundir))

    def _restore_point(self) -> dict | None:
        """The freshest verified copy over memory, peer and storage; journalled with what was skipped."""
        gone = self.nodes.prune_dead()
        if gone:
            self.journal.append("nodes_lost", nodes=gone)
        t0 = time.time()
        source, skipped = self.nodes.restore_source(self.store, self.spec.fingerprint())
        if source or skipped:
            self.journal.append("restore", step=source["step"] if source else 0,
                                tier=source["tier"] if source else "none",
                                node=source["node"] if source else None, skipped=skipped,
                                lookup_s=round(time.time() - t0, 4))
        return source

    def _attempt(self, pg) -> None:
        source = self._restore_point()
        restore_step = source["step"] if source else None
        if self.pending_recovery:
            idx, fault, _ = self.pending_recovery
            self.pending_recovery = (idx, fault, restore_step or 0)
        fired = self._fired()
        group = WorkerGroup(self.spec, self.rundir, pg, attempt=self.restarts)
        try:
            try:
                group.start(source, sorted(fired), self.base_ref, self.nodes.agent_for)
            except GroupStartError as e:
                kind = FaultKind.CRASH if e.dead else FaultKind.START_TIMEOUT
                self._handle(Fault(kind, e.rank, (restore_step or 0) + 1, time.time(), str(e)), group)
                return
            outcome = self._watch(group, restore_step or 0, fired)
            if isinstance(outcome, Fault):
                self._handle(outcome, group)
            elif outcome == "done":
                self.journal.append("final", path=self.rundir.url("final"), step=self.step)
                self._to(JobState.SUCCEEDED, f"all {self.spec.train.steps} steps done; final adapter written")
            elif outcome == "stopped":
                self._to(JobState.STOPPED, f"stopped on request at step {self.step}; state persisted")
        finally:
            group.shutdown()

    def _handle(self, fault: Fault, group: WorkerGroup) -> None:
        if self.state == JobState.STOPPING:
            self._to(JobState.FAILED, f"{policy.describe(fault)} while stopping")
            return
        self._to(JobState.DIAGNOSING, policy.describe(fault))
        self.journal.append("fault", **fault.to_record())
        idx = self.fault_index
        self.fault_index += 1
        decision = policy.decide(fault, self.restarts, self.spec.supervisor)
        self.journal.append("decision", fault_index=idx, **decision.to_record())
        if decision.action == Action.GIVE_UP:
            self._to(JobState.FAILED, decision.reason)
            return
        self._to(JobState.RESTARTING, decision.reason)
        t0 = time.time()
        group.shutdown()
        self.restarts += 1
        if decision.delay_s:
            time.sleep(decision.delay_s)
        self.journal.append("teardown", fault_index=idx, seconds=time.time() - t0)
        self.pending_recovery = (idx, fault, 0)
        self._to(JobState.STARTING, f"restart {self.restarts}")

    def _watch(self, group: WorkerGroup, restored: int, fired: dict[int, dict]) -> Fault | str:
        """Poll the group until it finishes, stops, or shows a fault (returned as a Fault)."""
        cfg = self.spec.supervisor
        last_step, last_progress = restored, time.time()
        running = False
        error_since: float | None = None
        while True:
            group.poll(TICK)
            now = time.time()
            if self.state != JobState.STOPPING and self._stop_requested():
                group.request_stop()
                if self.state == JobState.STARTING:
                    self._to(JobState.RUNNING, "workers started")
                self._to(JobState.STOPPING, "stop requested (resilient stop)")
            hb = group.latest
            self._journal_checkpoints(hb)
            self._journal_events(self.nodes.poll_events())
            if group.dead:
                rank = min(group.dead)
                return self._fault(FaultKind.CRASH, rank, last_step + 1, group.dead[rank], group, fired)
            errors = {r: h["error"] for r, h in hb.items() if h.get("phase") == "error"}
            if errors:
                # A peer's death surfaces in the survivors as collective errors first: give Ray a moment
                # to report the death, which is the root cause, before blaming the error.
                error_since = error_since or now
                if now - error_since > 2.0:
                    rank = min(errors)
                    return self._fault(FaultKind.ERROR, rank, last_step + 1, errors[rank], group, fired)
            for rank, seen in group.last_answer.items():
                # The heartbeat is answered by its own thread in every phase, so once a rank has
                # answered, silence means the process is stuck; before that it may still be starting.
                phase = hb.get(rank, {}).get("phase", "created")
                limit = cfg.hang_timeout if rank in hb else cfg.start_timeout
                if rank not in group.pending or now - seen <= limit:
                    continue
                return self._fault(FaultKind.HANG, rank, last_step + 1,
                                   f"rank {rank} answered no heartbeat for {now - seen:.1f}s (phase {phase})", group, fired)
            phases = [hb.get(r, {}).get("phase") for r in range(self.spec.cluster.num_workers)]
            if not running and all(p in ("training", "exporting", "done", "stopped") for p in phases):
                running = True
                last_progress = now
                if self.state == JobState.STARTING:
                    self._to(JobState.RUNNING, "all ranks training")
            step = min((h.get("step", 0) for h in hb.values()), default=0) if len(hb) == len(phases) else last_step
            ended = None
            if all(p == "done" for p in phases):
                ended = "done"
            elif all(p in ("stopped", "done") for p in phases) and "stopped" in phases:
                ended = "stopped"
            if step > last_step or ended:
                last_step, last_progress = max(step, last_step), now
                self._progress(last_step, hb, force=bool(ended))
            elif running and all(p == "training" for p in phases) and now - last_progress > cfg.hang_timeout:
                return self._fault(FaultKind.HANG, None, last_step + 1,
                                   f"no rank finished a step for {now - last_progress:.1f}s", group, fired)
            if ended:
                return ended

    def _fault(self, kind: FaultKind, rank: int | None, step: int, evidence: str, group: WorkerGroup,
               fired: dict[int, dict]) -> Fault:
        injected = None
        for rec in self._fired().values():  # a planned fault that fired in this attempt
            if rec["index"] not in fired and (rank is None or rec["rank"] == rank):
                injected, step = rec["injected_at"], rec["step"]
        return Fault(kind, rank, step, time.time(), evidence, injected_at=injected,
                     node=group.node_of(rank) if rank is not None else None)

    def _journal_checkpoints(self, hb: dict[int, dict]) -> None:
        for rank, h in hb.items():
            for rec in h.get("checkpoints", []):
                self.journal.append("checkpoint", rank=rank, tier="memory", **rec)
            h["checkpoints"] = []

    def _journal_events(self, events: list[dict]) -> None:
        for e in events:
            kind = e.pop("event")
            if kind != "replicated":  # one per snapshot: counted by the agent, not journalled
                self.journal.append(kind, **e)

    def _progress(self, step: int, hb: dict[int, dict], force: bool = False) -> None:
        self.step = step
        h0 = hb.get(0, {})
        if self.pending_recovery and step > self.pending_recovery[2]:
            idx, fault, restored = self.pending_recovery
            done_at = max(h.get("first_step_done_at") or h.get("step_done_at") or time.time() for h in hb.values())
            start = fault.injected_at or fault.detected_at
            self.journal.append("recovered", fault_index=idx, recovered_at=done_at,
                                recovery_s=round(done_at - start, 3), steps_replayed=max(0, fault.step - 1 - restored))
            self.pending_recovery = None
        now = time.time()
        if force or now - self._last_progress_journal >= 2.0:
            self._last_progress_journal = now
            self.journal.append("progress", step=step, loss=h0.get("mean_loss"), tokens_per_s=h0.get("tokens_per_s"))
        self._emit(loss=h0.get("mean_loss"), tokens_per_s=h0.get("tokens_per_s"))
