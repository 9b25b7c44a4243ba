"""TrainWorker: the Ray actor of one rank.

Contract: `start()` returns at once and trains in a background thread, so `heartbeat()` is answered
while a step runs (the actor is threaded); the `Heartbeat` is the supervisor's only window into the
rank. The planned faults it is given (`PlannedFault`, computed by the chaos controller) fire at the
start of their step, once: the marker goes to the run directory before the damage, so a restarted
group does not fire it again. `inject()` is chaos from outside. Either way the worker only does
the damage (`sabotage`, the node's simulated GPU, a NaN loss, a slower step).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from typing import Any

import ray

from resilient.agents.heartbeat import Heartbeat
from resilient.agents.output import capture
from resilient.agents.sabotage import PROCESS_DAMAGE, damage
from resilient.catalogue import GPU, PlannedFault
from resilient.checkpoint.source import RestoreSource
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import JobSpec
from resilient.rundir import RunDir, markers, staged
from resilient.rundir.layout import BASE_MODEL, DATA

log = logging.getLogger(__name__)
METRICS_CAP = 5000  # per-step records kept while nobody drains them (the newest win)


def _warm_imports() -> None:
    """What a rank needs before its first step, imported while nothing waits for it (warm
    spares)."""
    import peft  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import resilient.checkpoint.engine  # noqa: F401
    import resilient.training.trainer  # noqa: F401


def _lower_this_thread() -> None:
    """SCHED_IDLE for the calling thread only (Linux: policy and niceness are per thread), so the
    thread that will train is never lowered (an unprivileged process could not raise it back)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: a plain nice
        try:
            os.nice(10)
        except OSError:
            pass


@ray.remote(max_concurrency=4)
class TrainWorker:
    def __init__(self, spec: dict, rank: int, run_uri: str, attempt: int):
        """`rank = -1` makes a warm spare: it prepares, then waits for `info(rank, attempt)`."""
        self.output = capture()  # before anything prints: every line reaches logs/rank-N.log
        self.spec = JobSpec.model_validate(spec)
        if rank >= 0:
            _warm_imports()
        self.rank, self.world, self.attempt = rank, self.spec.cluster.num_workers, attempt
        self.rundir = RunDir(run_uri, self.spec.checkpoint.storage_options)
        self.store = CheckpointStore(self.rundir)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.metrics: list[dict] = []  # one record per step, drained by the heartbeat
        self.engine = None
        self.slow = 1.0
        self._injected: list[tuple[str, dict, bool]] = []  # faults met at the next step
        self._chaos_ack = threading.Event()
        self.status: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "phase": "created"}
        self._prepared = None
        self._warm = threading.Event()
        if rank < 0:  # a spare warms up on a thread of its own, at low priority (see _warm_up)
            threading.Thread(target=self._warm_up, daemon=True, name="spare-warm-up").start()
        else:
            self._warm.set()

    def _warm_up(self) -> None:
        """Imports, data and model of a spare, on this thread only, at idle priority: it runs on
        CPU time the ranks leave unused (and at full speed in a restart, when the ranks are
        gone)."""
        _lower_this_thread()
        t0 = time.perf_counter()
        try:
            _warm_imports()
            self._prepared = self._prepare()
            log.info("spare warm in %.1fs (imports, data, model)", time.perf_counter() - t0)
        except Exception:  # the rank builds its own when promoted; nothing is lost
            log.exception("spare warm-up failed; a promotion builds the model then")
            self._prepared = None
        finally:
            self._warm.set()

    def _prepare(self):
        """A spare builds its model and data now, on the device its slot holds (a GPU spare loads
        onto its GPU), so a promotion only connects them."""
        trainer = self._trainer(-1, self._device())
        trainer.prepare()
        return trainer

    def ping(self) -> int:
        """Answers once this worker is warm (a spare: imports, data and model ready)."""
        self._warm.wait()
        return os.getpid()

    def info(self, rank: int | None = None, attempt: int | None = None) -> dict:
        """Where this worker runs (and a free port for rank 0's rendezvous); a spare takes its
        rank here."""
        from resilient.agents.rendezvous import free_port, node_ip

        if rank is not None:
            self._warm.wait()  # a spare promoted before it is warm finishes warming first
            self.rank, self.attempt = rank, attempt
            self._set(rank=rank)
        ip = node_ip()
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "ip": ip,
            "port": free_port(ip),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpus": [int(g) if str(g).isdigit() else g for g in ray.get_gpu_ids()],
        }

    def start(
        self,
        master_ip: str,
        master_port: int,
        restore: RestoreSource | None,
        plan: tuple[PlannedFault, ...],
        base_ref: str,
        agent,
        skip: list[int],
        node_index: int = -1,
    ) -> None:
        """Train in the background from `restore` (None: from scratch). `plan`: the planned faults
        still to fire; `agent`: this node's NodeAgent; `skip`: data steps rollbacks took out."""
        self.agent, self.skip, self.node_index = agent, set(skip), node_index
        self.plan, self._fired = plan, set()
        if agent is not None:
            agent.register.remote(self.rank, os.getpid())
        args = (master_ip, master_port, restore, base_ref)
        threading.Thread(
            target=self._main, args=args, daemon=True, name=f"train-rank{self.rank}"
        ).start()

    def heartbeat(self) -> Heartbeat:
        engine = self.engine
        with self._lock:
            status = dict(self.status)
            metrics, self.metrics = self.metrics, []
        return Heartbeat(
            **status,
            now=time.time(),
            metrics=tuple(metrics),
            checkpoints=tuple(engine.drain_records()) if engine else (),
            snapshot_step=engine.latest.step if engine and engine.latest else None,
            logs=self.output.drain(),
        )

    def flush(self) -> int | None:
        """Hand this rank's newest snapshot to its node agent now (a survivor, before a restart)."""
        return self.engine.flush() if self.engine else None

    def request_stop(self) -> None:
        self._stop.set()

    def inject(self, fault: str, params: dict, fatal: bool = False) -> None:
        """Chaos from outside (timed, random, `resilient chaos inject`): a process fault now, the
        others at the start of the next step."""
        if fault in PROCESS_DAMAGE:
            damage(fault)
        elif fault == "slow":
            self.slow = params.get("factor", 2.0)
        else:
            self._injected.append((fault, params, fatal))

    def chaos_done(self) -> None:
        """The supervisor carried out the job-wide fault this rank asked for."""
        self._chaos_ack.set()

    def _set(self, **kw: Any) -> None:
        with self._lock:
            self.status.update(kw)

    # -- the training thread ---------------------------------------------------------------------
    def _main(self, master_ip, master_port, restore, base_ref) -> None:
        try:
            trainer, step, data_step = self._setup(master_ip, master_port, restore)
            step = self._train(trainer, step, data_step)
            if step is not None:
                self._finish(trainer, step, base_ref)
        except BaseException as e:  # reported, never raised: the supervisor decides
            log.exception("rank %s failed", self.rank)  # the whole traceback, in its log
            self._set(
                phase="error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"
            )

    def _device(self):
        import torch

        return torch.device("cuda", 0) if self._backend() == "nccl" else torch.device("cpu")

    def _backend(self) -> str:
        b = self.spec.cluster.backend
        if b == "auto":
            return "nccl" if self.spec.cluster.resources_per_worker.get("GPU", 0) > 0 else "gloo"
        return b

    def _trainer(self, rank: int, device):
        """A rank's trainer over the inputs staged in the run directory: workers never read the
        driver's disk (nor the user's input files, which may be gone by now)."""
        from resilient.training.trainer import Trainer

        base, data = staged.local_dir(self.rundir, BASE_MODEL), staged.local_dir(self.rundir, DATA)
        return Trainer(self.spec, rank, self.world, base, device, data_dir=data)

    def _setup(self, master_ip, master_port, restore: RestoreSource | None):
        """Join the process group, build (or take the prepared) trainer, restore; (trainer, step,
        data step) to go on from."""
        import torch

        from resilient.agents.rendezvous import init_process_group, node_ip
        from resilient.checkpoint.engine import CheckpointEngine
        from resilient.checkpoint.source import load

        spec, cc = self.spec, self.spec.checkpoint
        torch.set_num_threads(max(1, int(spec.cluster.resources_per_worker.get("CPU", 1))))
        self._set(phase="rendezvous")
        init_process_group(
            self._backend(),
            master_ip,
            master_port,
            self.rank,
            self.world,
            spec.supervisor.collective_timeout,
            node_ip(),
        )
        self._set(phase="loading")
        t_load = time.perf_counter()
        trainer, self._prepared = self._prepared, None
        warm = trainer is not None
        if trainer is None:
            trainer = self._trainer(self.rank, self._device())
            trainer.prepare()
        trainer.rank, trainer.device = self.rank, self._device()
        trainer.connect()
        self.engine = CheckpointEngine(
            self.agent, spec.fingerprint(), cc.persist_every, cc.every, self.rank, cc.handoff_s
        )
        step = data_step = 0
        if restore:
            self._set(phase="restoring")
            t0 = time.perf_counter()
            snap = load(restore, self.store, spec.fingerprint())
            trainer.restore(snap)
            step, data_step = snap.step, snap.data_step
            self._set(restore_s=time.perf_counter() - t0)
        log.info(
            "rank %d (attempt %d) training from step %d: %s, ready in %.2fs after the rendezvous",
            self.rank,
            self.attempt,
            step,
            "warm spare" if warm else "model built now",
            time.perf_counter() - t_load,
        )
        self._set(phase="training", step=step, training_at=time.time())
        return trainer, step, data_step

    def _train(self, trainer, step: int, data_step: int) -> int | None:
        """Steps until the last one or an agreed stop; the step reached (None: a NaN step)."""
        restored, total, every = step, self.spec.train.steps, self.spec.checkpoint.every
        while step < total:
            poison = self._faults_at(step + 1)
            next_data = data_step + 1
            while next_data in self.skip:
                next_data += 1
            r = trainer.step(next_data, stop=self._stop.is_set(), poison=poison, slow=self.slow)
            self._record(step + 1, next_data, r)
            if r.nonfinite:  # no rank applied this update; the supervisor rolls back and skips it
                self._set(phase="nonfinite")
                return None
            step, data_step, now = step + 1, next_data, time.time()
            self._set(
                step=step,
                mean_loss=r.mean_loss,
                step_done_at=now,
                tokens_per_s=r.tokens / max(r.step_time + r.data_wait, 1e-9),
            )
            if step == restored + 1:
                self._set(first_step_done_at=now)
            final = step == total or r.stop
            if step % every == 0 or final:
                self.engine.save(trainer, step, data_step, final)
            if self.engine.error:
                raise RuntimeError(self.engine.error)
            if r.stop:
                break
        return step

    def _record(self, step: int, data_step: int, r) -> None:
        rec = {
            "t": time.time(),
            "rank": self.rank,
            "step": step,
            "data_step": data_step,
            "loss": r.loss,
            "mean_loss": r.mean_loss,
            "grad_norm": r.grad_norm,
            "step_time": r.step_time,
            "compute_s": r.compute_s,
            "data_wait": r.data_wait,
            "attempt": self.attempt,
            "tokens_per_s": r.tokens / max(r.step_time + r.data_wait, 1e-9),
            "overflow": r.overflow,
        }
        with self._lock:
            self.metrics.append(rec)
            if len(self.metrics) > METRICS_CAP:  # nobody is draining them: keep the newest
                del self.metrics[:-METRICS_CAP]

    def _finish(self, trainer, step: int, base_ref: str) -> None:
        """Rank 0 makes the last step durable (and exports the adapter) before the job may end."""
        from resilient.rundir.layout import FINAL
        from resilient.training.trainer import export_to

        total = self.spec.train.steps
        if self.rank == 0:
            self._set(phase="persisting")
            self.engine.finish(step, self.spec.checkpoint.persist_timeout)
            if step == total:
                self._set(phase="exporting")
                export_to(self.rundir, trainer, FINAL, base_ref)
        self._set(phase="done" if step == total else "stopped")

    # -- chaos: only the damage ------------------------------------------------------------------
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
