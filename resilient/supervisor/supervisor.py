"""The supervisor loop: start the worker group, watch it, turn what it sees into faults, act on the
policy's decisions, and journal all of it.

Contract: `Supervisor.run()` drives a new (or resumed) run from PENDING to SUCCEEDED, FAILED or
STOPPED and returns the folded status. Every state change goes through `state.transition()` and is
journalled with its cause; every fault, anomaly, decision, restore, rollback, cordon and checkpoint
is journalled before it is acted on. What it needs to go on (restarts, cordoned nodes, skipped
batches) is rebuilt from the journal, so a resumed supervisor behaves like the one that died.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

from resilient.agents.group import GroupStartError, SparePool, WorkerGroup, uses_spares
from resilient.anomaly.events import CORDON, WARN, AnomalyEvent
from resilient.anomaly.monitor import AnomalyMonitor
from resilient.chaos.inject import carry_out, marker, pending_requests
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import GPU_FAULTS, JobSpec
from resilient.rundir import RunDir
from resilient.supervisor import policy
from resilient.supervisor.faults import Action, Fault, FaultKind
from resilient.supervisor.journal import Journal, read_records
from resilient.supervisor.nodes import Nodes, assign
from resilient.supervisor.state import TERMINAL, JobState, transition
from resilient.supervisor.status import fold
from resilient.supervisor.watch import Watch

STOP_FILE = "control/stop"


class Supervisor:
    def __init__(self, spec: JobSpec, rundir: RunDir, journal: Journal, base_ref: str,
                 on_progress: Callable[[dict], None] | None = None):
        self.spec, self.rundir, self.journal, self.base_ref = spec, rundir, journal, base_ref
        self.store = CheckpointStore(rundir)
        self.nodes = Nodes()
        self.spares = SparePool(spec, rundir.uri) if uses_spares(spec) else None
        self.monitor = AnomalyMonitor(spec, rundir)
        self.on_progress = on_progress or (lambda s: None)
        status = fold(read_records(rundir))
        self.state = JobState(status["state"])
        self.restarts = status["restarts"]
        self.fault_index = len(status["faults"])
        self.cordoned = {c["node"]: c["reason"] for c in status["cordoned_nodes"]}
        self.skip = sorted({b for r in status["rollbacks"] for b in r["skipped_batches"]})
        self.pending_recovery: tuple[int, Fault, int] | None = None  # (fault index, fault, restored step)
        self.pending_rollback: dict | None = None
        self.step = status["step"]
        self._last_progress_journal = 0.0
        self._stop_seen, self._closed = False, False
        self._requests: list[tuple[str, dict]] = []
        self._last_chaos_tick = 0.0
        self.training_s = max((r.get("training_s", 0.0) for r in read_records(rundir) if r["type"] == "progress"),
                              default=0.0)  # seconds spent training (all ranks stepping), over every attempt

    # -- bookkeeping -------------------------------------------------------------------------------
    def _to(self, new: JobState, cause: str) -> None:
        old, self.state = self.state, transition(self.state, new)
        self.journal.append("transition", **{"from": old.value, "to": new.value, "cause": cause})
        self._emit()

    def _emit(self, **extra) -> None:
        self.on_progress({"state": self.state.value, "step": self.step, "total": self.spec.train.steps,
                          "restarts": self.restarts, **extra})

    def fired(self) -> dict[int, dict]:
        """Planned faults that already fired (their markers), by chaos index."""
        out = {}
        try:
            for name in self.rundir.listdir("chaos"):
                if name.startswith("fired-") and name.endswith(".json"):
                    rec = self.rundir.read_json(f"chaos/{name}")
                    out[rec["index"]] = rec
        except Exception:  # storage outage: markers are best effort
            pass
        return out

    def stop_requested(self) -> bool:
        return self._stop_seen

    def _poll_control(self) -> None:
        """Background: look for `resilient stop` and `resilient chaos inject` requests in the run
        directory every second, so the watch loop never waits on storage (which may be down)."""
        while not self._closed:
            try:
                self._stop_seen = self._stop_seen or self.rundir.exists(STOP_FILE)
                for req_id, req in pending_requests(self.rundir):
                    self.rundir.remove(f"control/inject-{req_id}.json")
                    self._requests.append((req_id, req))
            except Exception:  # storage outage: ask again next time
                pass
            time.sleep(1.0)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> dict:
        if self.state != JobState.PENDING:
            raise RuntimeError(f"the journal says {self.state.value}; only a new or resumed run can be supervised")
        # A resumed run starts over from PENDING too (its journal's `resume` record says so) and
        # restores from the newest persisted checkpoint: memory tiers died with the old driver.
        self._to(JobState.PREFLIGHT, "job accepted")
        threading.Thread(target=self._poll_control, daemon=True, name="control").start()
        try:
            self.journal.append("nodes", nodes=self.nodes.start(self.spec, self.rundir.uri))
            first = assign(self.spec.cluster.num_workers, self.spec.cluster.resources_per_worker,
                           self.nodes.order, self.nodes.resources, set(self.cordoned))
            if self.spares and first:
                self.spares.fill(first)  # warming up beside the first group: ready for the first fault
            self._to(JobState.STARTING, "preflight passed: node agents up")
            while self.state not in TERMINAL:
                self._attempt()
        finally:
            self._journal_events(self.nodes.flush_events())
            self.nodes.shutdown()
            if self.spares:
                self.spares.shutdown()
            self.monitor.close()
            self._closed = True
            self.journal.flush(timeout=self.spec.checkpoint.persist_timeout)
        return fold(read_records(self.rundir))

    def _restore_point(self, at_most: int | None) -> dict | None:
        """The freshest verified copy over memory, peer and storage; journalled with what was skipped."""
        gone = self.nodes.prune_dead()
        if gone:
            self.journal.append("nodes_lost", nodes=gone)
        t0 = time.time()
        source, skipped = self.nodes.restore_source(self.store, self.spec.fingerprint(), at_most)
        if source or skipped:
            self.journal.append("restore", step=source["step"] if source else 0,
                                tier=source["tier"] if source else "none",
                                node=source["node"] if source else None, skipped=skipped,
                                lookup_s=round(time.time() - t0, 4))
        return source

    def _attempt(self) -> None:
        rollback, self.pending_rollback = self.pending_rollback, None
        source = self._restore_point(rollback["rollback_to"] if rollback else None)
        restore_step = source["step"] if source else 0
        if rollback:
            self.skip = sorted(set(self.skip) | set(rollback["skip_batches"]))
            self.journal.append("rollback", from_step=rollback["from_step"], to_step=restore_step,
                                skipped_batches=list(rollback["skip_batches"]), reason=rollback["reason"])
        if self.pending_recovery:
            idx, fault, _ = self.pending_recovery
            self.pending_recovery = (idx, fault, restore_step)
        placement = assign(self.spec.cluster.num_workers, self.spec.cluster.resources_per_worker,
                           self.nodes.order, self.nodes.resources, set(self.cordoned) | self.nodes.lost())
        if placement is None:
            self._to(JobState.FAILED, f"the healthy nodes cannot hold cluster.num_workers="
                     f"{self.spec.cluster.num_workers} (cordoned: {sorted(self.cordoned) or 'none'}); add nodes "
                     "or lower cluster.num_workers, then `resilient launch --resume RUN_DIR`")
            return
        fired = self.fired()
        group = WorkerGroup(self.spec, self.rundir, placement, attempt=self.restarts)
        try:
            try:
                group.start(source, sorted(i for i in fired if isinstance(i, int)), self.base_ref,
                            self.nodes.agent_for, self.skip, self.nodes.index_of, self.spares)
                if self.spares:
                    self.spares.fill(placement)  # replacements for the next restart, warming up meanwhile
            except GroupStartError as e:
                kind = FaultKind.CRASH if e.dead else FaultKind.START_TIMEOUT
                self._handle(Fault(kind, e.rank, restore_step + 1, time.time(), str(e)), group)
                return
            outcome = Watch(self, group, restore_step, fired).run()
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
        for node in decision.exclude_nodes:
            self.cordon(node, decision.reason)
        if decision.action == Action.ROLLBACK:
            self.pending_rollback = {"from_step": fault.step, "rollback_to": decision.rollback_to,
                                     "skip_batches": decision.skip_batches, "reason": decision.reason}
        self._to(JobState.ROLLING_BACK if decision.action == Action.ROLLBACK else JobState.RESTARTING, decision.reason)
        t0 = time.time()
        last = group.final_heartbeats()
        self.journal_checkpoints(last)
        flushed = group.flush_newest(last)  # the survivors' newest state goes to memory first
        if flushed and flushed["step"] is not None:
            self.journal.append("checkpoint", rank=flushed["rank"], tier="memory", step=flushed["step"],
                                handoff_s=flushed["seconds"], flush=True, fault_index=idx)
        self.monitor.training([m for h in last.values() for m in h.get("metrics", [])])  # recorded, not acted on
        group.shutdown()
        self.restarts += 1
        self.journal.append("restart", n=self.restarts, fault_index=idx)
        if decision.delay_s:
            time.sleep(decision.delay_s)
        self.journal.append("teardown", fault_index=idx, seconds=time.time() - t0)
        self.pending_recovery = (idx, fault, 0)
        self._to(JobState.STARTING, f"restart {self.restarts}")

    def cordon(self, node: str, reason: str) -> None:
        if node not in self.cordoned:
            self.cordoned[node] = reason
            self.journal.append("cordon", node=node, reason=reason)

    # -- what the watch reports ---------------------------------------------------------------------
    def on_anomaly(self, e: AnomalyEvent, group: WorkerGroup) -> Fault | None:
        """Journal an event; return the Fault to act on, or None when it needs no restart."""
        ranks_on_node = [r for r, n in enumerate(group.placement) if e.node and n == e.node]
        decision = e.action
        if e.action == CORDON and not ranks_on_node:
            self.cordon(e.node, f"{e.kind}: {e.evidence.get('reason', '')} (no rank there: no restart)")
            decision = "cordon_only"
        self.journal.append("anomaly", kind=e.kind, severity=e.severity, action=e.action, node=e.node, rank=e.rank,
                            step=e.step, evidence=e.evidence, decision=decision, event_t=e.t)
        self.monitor.record_event(e, decision)
        if e.action == WARN or decision == "cordon_only":
            return None
        rank = e.rank if e.rank is not None else (ranks_on_node[0] if ranks_on_node else None)
        step = e.step or self.step + 1
        skip: tuple[int, ...] = ()
        rollback_to = None
        if e.kind == "nan":
            rollback_to, skip = step - 1, tuple(group.data_steps.get(step, ()))
        elif e.kind == "loss_spike":
            spikes = e.evidence.get("spike_steps", [step])
            rollback_to = min(spikes) - 1
            skip = tuple(d for s in spikes for d in group.data_steps.get(s, ()))
        evidence = f"{e.kind}: {e.evidence}"
        return Fault(FaultKind.ANOMALY, rank, step, time.time(), evidence[:500], node=e.node,
                     anomaly=e.kind, suggested=e.action, rollback_to=rollback_to, skip_batches=skip)

    def fire_gpu_chaos(self, step: int, group: WorkerGroup, fired: dict[int, dict]) -> None:
        """A GPU fault on a node where no rank runs (the ranks fire their own, at the exact step) is set
        on that node's simulated GPU by the supervisor when the job reaches its step."""
        for i, c in enumerate(self.spec.chaos):
            if c.fault not in GPU_FAULTS or c.node is None or c.at_step is None or i in fired or c.at_step > step:
                continue
            node = self.nodes.node_at(c.node)
            if node in group.placement:
                continue
            agent = self.nodes.agent_for(node) if node else None
            rec = {"index": i, "fault": c.fault, "rank": c.target_rank, "node": node, "step": step,
                   "injected_at": time.time()}
            fired[i] = rec
            try:
                self.rundir.write_json(f"chaos/fired-{i:04d}.json", rec)
            except Exception:
                pass
            if agent is not None:
                agent.gpu_fault.remote(c.fault, 0, xid=c.xid, count=c.count, temperature=c.temperature)
            self.journal.append("chaos", **rec)

    def chaos_tick(self, group: WorkerGroup, fired: dict) -> None:
        """Carry out timed chaos that is due and `resilient chaos inject` requests (about once a second)."""
        now = time.time()
        if now - self._last_chaos_tick < 1.0:
            return
        self._last_chaos_tick = now
        # `at_time` counts training time (the clock stops while the job restarts), so random chaos
        # models faults per hour of training, and one fault never lands in the previous one's recovery.
        due = [(i, c) for i, c in enumerate(self.spec.chaos)
               if c.at_time is not None and i not in fired and self.training_s >= c.at_time]
        for i, c in due:
            params = {k: getattr(c, k) for k in ("factor", "xid", "count", "temperature", "seconds")}
            self._inject(group, fired, i, c.fault, c.rank, c.node, params)
        while self._requests:
            req_id, req = self._requests.pop(0)
            self._inject(group, fired, f"req-{req_id}", req["fault"], req.get("rank"), req.get("node"),
                         req.get("params", {}), request=req_id)

    def chaos_requested(self, group: WorkerGroup, hb: dict[int, dict], fired: dict) -> None:
        """Rank 0 reached the step of a job-wide fault and waits for it: carry it out, then release it."""
        index = hb.get(0, {}).get("chaos_request")
        if index is None or index in fired:
            return
        c = self.spec.chaos[index]
        params = {k: getattr(c, k) for k in ("factor", "xid", "count", "temperature", "seconds")}
        self._inject(group, fired, index, c.fault, c.rank, c.node, params)
        group.workers[0].chaos_done.remote()

    def _inject(self, group, fired, index, fault, rank, node, params, request=None) -> None:
        try:
            rec = carry_out(self, group, fault, rank, node, params, index)
        except Exception as e:  # a request the job cannot honour: say so, keep training
            self.journal.append("chaos_refused", index=index, fault=fault, request=request, error=str(e))
            fired[index] = {}
            return
        rec.update(index=index, request=request)
        fired[index] = rec
        try:
            self.rundir.write_json(marker(index), rec)
        except Exception:
            pass
        self.journal.append("chaos", **rec)

    def journal_checkpoints(self, hb: dict[int, dict]) -> None:
        for rank, h in hb.items():
            for rec in h.get("checkpoints", []):
                self.journal.append("checkpoint", rank=rank, tier="memory", **rec)
            h["checkpoints"] = []

    def _journal_events(self, events: list[dict]) -> None:
        for e in events:
            kind = e.pop("event")
            if kind != "replicated":  # one per snapshot: counted by the agent, not journalled
                self.journal.append(kind, **e)

    def node_events(self) -> list[AnomalyEvent]:
        events, samples = self.nodes.poll_events()
        self._journal_events(events)
        out = []
        for node, sample in samples:
            out += self.monitor.node(node, sample)
        self.monitor.maybe_flush()
        return out

    def progress(self, step: int, hb: dict[int, dict], force: bool = False) -> None:
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
            self.journal.append("progress", step=step, loss=h0.get("mean_loss"), tokens_per_s=h0.get("tokens_per_s"),
                                training_s=round(self.training_s, 3))
        self._emit(loss=h0.get("mean_loss"), tokens_per_s=h0.get("tokens_per_s"))
