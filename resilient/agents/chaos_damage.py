"""The damage a TrainWorker does to itself for chaos (a mixin of TrainWorker).

Contract: the planned faults it is given (`PlannedFault`, computed by the chaos controller) fire at
the start of their step, once: the marker goes to the run directory before the damage, so a
restarted group does not fire it again. `inject()` is chaos from outside: a process fault now, the
others at the start of the next step. Either way the worker only does the damage (`sabotage`, the
node's simulated GPU, a NaN loss, a slower step); job-wide faults are the supervisor's to carry out
(rank 0 holds the job at their step until `chaos_done()`).
"""

from __future__ import annotations

import logging
import time

import ray

from resilient.agents.sabotage import PROCESS_DAMAGE, damage
from resilient.catalogue import GPU
from resilient.rundir import markers

log = logging.getLogger(__name__)


class ChaosDamage:
    def inject(self, fault: str, params: dict, fatal: bool = False) -> None:
        """Chaos from outside (timed, random, `resilient chaos inject`): a process fault now, the
        others at the start of the next step."""
        if fault in PROCESS_DAMAGE:
            damage(fault)
        elif fault == "slow":
            self.slow = params.get("factor", 2.0)
        elif fault == "bad_compute":
            self.bad_compute = True
        else:
            self._injected.append((fault, params, fatal))

    def landing_step(self, fault: str) -> int:
        """The step `fault`, injected now, lands in: the one training now for a process fault
        (and for slow and bad_compute, in force at once), the next one for the others."""
        now = int(self.status.get("step") or 0) + 1
        return now if fault in PROCESS_DAMAGE or fault in ("slow", "bad_compute") else now + 1

    def chaos_done(self) -> None:
        """The supervisor carried out the job-wide fault this rank asked for."""
        self._chaos_ack.set()

    def _faults_at(self, step: int) -> bool:
        """Fire what is due at the start of `step`; True if this step's loss must be NaN."""
        poison = False
        for f in self.plan:
            if f.step != step or f.index in self._fired:
                continue
            if f.job_wide:  # the supervisor's to carry out; rank 0 holds the job at this step
                if self.rank == 0:
                    self._fired.add(f.index)
                    self._ask_supervisor(f.index)
                continue
            if not f.aims_at(self.rank, self.node_index):
                continue
            self._fired.add(f.index)
            fired = markers.FiredFault(
                markers.planned_key(f.index),
                f.fault,
                time.time(),
                step=step,
                rank=self.rank,
                index=f.index,
            )
            try:  # the marker keeps a restarted group from firing it again
                markers.write(self.rundir, fired)
            except Exception:  # storage is down: the fault still fires
                pass
            # the key: every rank on the node fires a node's GPU fault; the GPU takes it once
            poison |= self._apply(f.fault, {**f.params, "key": fired.key}, f.fatal)
        injected, self._injected = self._injected, []
        for fault, params, fatal in injected:
            poison |= self._apply(fault, params, fatal)
        return poison

    def _apply(self, fault: str, params: dict, fatal: bool) -> bool:
        """Do the damage; True when it is a NaN loss for this step."""
        if fault == "nan":
            return True
        if fault == "slow":
            self.slow = params.get("factor", 2.0)
        elif fault == "bitflip":
            what = self._trainer_now.flip_bit(self._data_step) if self._trainer_now else "nothing"
            log.warning("chaos bitflip: flipped one %s", what)
        elif fault == "bad_compute":  # the node's: it stays bad for every later life here
            self.bad_compute = True
        elif fault in GPU:
            ray.get(self.agent.gpu_fault.remote(fault, params))
            if fatal:  # the CUDA context would be gone: this rank's step fails
                xid = f" XID {params.get('xid')}" if fault == "gpu_xid" else ""
                raise RuntimeError(f"simulated {fault}{xid}: the GPU this rank runs on failed")
        else:
            damage(fault)
        return False

    def _ask_supervisor(self, index: int, timeout: float = 60.0) -> None:
        self._chaos_ack.clear()
        self._set(chaos_request=index)
        self._chaos_ack.wait(timeout)
        self._set(chaos_request=None)
