"""Watch: one attempt's polling loop, from a started worker group to its end or its first fault.

Contract: `Watch(supervisor, group, restored_step, fired).run()` returns "done", "stopped" or the
Fault to act on. Detection sources, in order of precedence: actor death (instant), a rank's
training error (after a short grace, since a dead peer shows up in survivors as collective errors
first), heartbeat silence or no progress for `hang_timeout` (hang), and actionable anomaly events.
"""
from __future__ import annotations

import statistics
import time

from resilient.agents.group import WorkerGroup
from resilient.supervisor.faults import Fault, FaultKind
from resilient.supervisor.state import JobState

TICK = 0.1          # seconds between polls: bounds crash-detection latency, costs ~nothing
ERROR_GRACE = 2.0   # seconds an error waits for a peer's death to explain it


class Watch:
    def __init__(self, sup, group: WorkerGroup, restored: int, fired: dict[int, dict]):
        self.sup, self.group, self.restored, self.fired = sup, group, restored, fired
        self.before = set(fired)  # markers that predate this attempt: not this attempt's faults
        self.cfg = sup.spec.supervisor
        self.world = sup.spec.cluster.num_workers
        self.last_step, self.last_progress = restored, time.time()
        self.running = False
        self.error_since: float | None = None
        self.step_times: list[float] = []

    def fault(self, kind: FaultKind, rank: int | None, evidence: str) -> Fault:
        step, injected = self.last_step + 1, None
        for rec in self.sup.fired().values():  # a planned fault that fired in this attempt
            if rec["index"] not in self.before and (rank is None or rec.get("rank") == rank):
                injected, step = rec["injected_at"], rec["step"]
        return Fault(kind, rank, step, time.time(), evidence, injected_at=injected,
                     node=self.group.node_of(rank) if rank is not None else None)

    def run(self) -> Fault | str:
        sup, group = self.sup, self.group
        last = time.time()
        while True:
            group.poll(TICK)
            now = time.time()
            if self.running and sup.state in (JobState.RUNNING, JobState.STOPPING):
                sup.training_s += now - last
            last = now
            if sup.state != JobState.STOPPING and sup.stop_requested():
                group.request_stop()
                if sup.state == JobState.STARTING:
                    sup._to(JobState.RUNNING, "workers started")
                sup._to(JobState.STOPPING, "stop requested (resilient stop)")
            hb = group.latest
            sup.journal_checkpoints(hb)
            events = self.ingest(hb)  # first, so what arrived with this poll is recorded whatever happens
            if group.dead:
                rank = min(group.dead)
                return self.fault(FaultKind.CRASH, rank, group.dead[rank])
            found = self.act_on(events)
            if found:
                return found
            errors = {r: h["error"] for r, h in hb.items() if h.get("phase") == "error"}
            if errors:
                self.error_since = self.error_since or now
                if now - self.error_since > ERROR_GRACE:
                    rank = min(errors)
                    return self.fault(FaultKind.ERROR, rank, errors[rank])
            hung = self.silent_rank(now, hb)
            if hung is not None:
                return hung
            outcome = self.advance(now, hb)
            if outcome:
                return outcome

    def ingest(self, hb: dict[int, dict]) -> list:
        """Hand the new per-step metrics and node samples to the monitor; return the events raised."""
        rows = []
        for h in hb.values():
            rows += h.get("metrics", [])
            h["metrics"] = []
        for r in rows:
            self.group.data_steps.setdefault(r["step"], set()).add(r["data_step"])
            self.step_times.append(r["step_time"] + r["data_wait"])
        return self.sup.monitor.training(rows) + self.sup.node_events()

    def act_on(self, events: list) -> Fault | None:
        self.sup.fire_gpu_chaos(self.last_step + 1, self.group, self.fired)
        self.sup.chaos_requested(self.group, self.group.latest, self.fired)
        if self.running:
            self.sup.chaos_tick(self.group, self.fired)
        for e in events:
            fault = self.sup.on_anomaly(e, self.group)
            if fault is not None:
                if fault.anomaly == "nan" or fault.rank is not None:
                    fault = self._with_injection(fault)
                return fault
        return None

    def _with_injection(self, fault: Fault) -> Fault:
        from dataclasses import replace

        for rec in self.sup.fired().values():
            if rec["index"] not in self.before:
                step = fault.step if fault.anomaly in ("nan", "loss_spike") else rec["step"]
                return replace(fault, injected_at=rec["injected_at"], step=step)
        return fault

    def silent_rank(self, now: float, hb: dict[int, dict]) -> Fault | None:
        # The heartbeat is answered by its own thread in every phase, so once a rank has answered,
        # silence means the process is stuck; before that it may still be starting.
        for rank, seen in self.group.last_answer.items():
            limit = self.cfg.hang_timeout if rank in hb else self.cfg.start_timeout
            if rank in self.group.pending and now - seen > limit:
                phase = hb.get(rank, {}).get("phase", "created")
                return self.fault(FaultKind.HANG, rank, f"rank {rank} answered no heartbeat for {now - seen:.1f}s "
                                                        f"(phase {phase})")
        return None

    def advance(self, now: float, hb: dict[int, dict]) -> Fault | str | None:
        sup = self.sup
        phases = [hb.get(r, {}).get("phase") for r in range(self.world)]
        if not self.running and all(p in ("training", "persisting", "exporting", "done", "stopped") for p in phases):
            self.running, self.last_progress = True, now
            sup.journal.append("group_ready", restore_s=max(h.get("restore_s", 0.0) for h in hb.values()),
                               restored_step=self.restored,
                               ready_at=max(h.get("training_at") or now for h in hb.values()))
            if sup.state == JobState.STARTING:
                sup._to(JobState.RUNNING, "all ranks training")
        step = min((h.get("step", 0) for h in hb.values()), default=0) if len(hb) == self.world else self.last_step
        ended = None
        if all(p == "done" for p in phases):
            ended = "done"
        elif all(p in ("stopped", "done") for p in phases) and "stopped" in phases:
            ended = "stopped"
        if step > self.last_step or ended:
            self.last_step, self.last_progress = max(step, self.last_step), now
            sup.progress(self.last_step, hb, force=bool(ended))
            if ended and self.step_times:
                sup.journal.append("progress_stats", median_step_s=statistics.median(self.step_times))
        elif self.running and all(p == "training" for p in phases) and now - self.last_progress > self.cfg.hang_timeout:
            return self.fault(FaultKind.HANG, None, f"no rank finished a step for {now - self.last_progress:.1f}s")
        return ended
