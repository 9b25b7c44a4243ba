"""TrainWorker: the Ray actor of one rank.

Contract: `start()` returns at once and trains in a background thread, so `heartbeat()` is answered
while a step runs (the actor is threaded). The heartbeat reports phase, progress, the checkpoints
taken since the last heartbeat and any error; it is the supervisor's only window into the rank.
Planned faults (`[[chaos]]`) fire at the start of their step, once: a marker is written to the run
directory before the fault so a restarted group does not fire it again.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
import traceback
from typing import Any

import ray

from resilient.checkpoint.storage import CheckpointStore
from resilient.config import GPU_FAULTS, PROCESS_FAULTS, JobSpec
from resilient.rundir import RunDir


def inject(fault: str) -> None:
    """Carry out a process-level fault on this very process."""
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "exit":
        os._exit(1)
    elif fault == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault == "node_loss":
        os.kill(raylet_pid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def raylet_pid() -> int:
    """The raylet that started this worker: the node this rank lives on."""
    import psutil

    for p in psutil.Process().parents():
        if "raylet" in p.name():
            return p.pid
    raise RuntimeError("no raylet among this worker's parent processes")


def _warm_imports() -> None:
    """What a rank needs before its first step, imported while nothing waits for it (warm spares)."""
    import peft  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import resilient.checkpoint.engine  # noqa: F401
    import resilient.training.trainer  # noqa: F401


@ray.remote(max_concurrency=4)
class TrainWorker:
    def __init__(self, spec: dict, rank: int, run_uri: str, attempt: int):
        """`rank = -1` makes a warm spare: imports done, waiting for `info(rank, attempt)` to become a rank."""
        self.spec = JobSpec.model_validate(spec)
        if rank >= 0:
            _warm_imports()
        self.rank, self.world, self.attempt = rank, self.spec.cluster.num_workers, attempt
        self.rundir = RunDir(run_uri, self.spec.checkpoint.storage_options)
        self.store = CheckpointStore(self.rundir)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.metrics: list[dict] = []  # one record per step, drained by the heartbeat
        self.slow = 1.0
        self._poison_next = False
        self._gpu_fault_pending = None
        self._chaos_ack = threading.Event()
        self.status: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "phase": "created", "step": 0,
                                       "error": None, "checkpoints": [], "started_at": time.time()}
        self._prepared = None
        self._warm = threading.Event()
        if rank < 0:  # a spare warms up on a thread of its own, at low priority (see _warm_up)
            threading.Thread(target=self._warm_up, daemon=True, name="spare-warm-up").start()
        else:
            self._warm.set()

    def _warm_up(self) -> None:
        """Imports, data and model of a spare, on this thread only, at idle priority: it runs on
        CPU time the ranks leave unused (and at full speed in a restart, when the ranks are gone).
        Scheduling policy and niceness are per thread on Linux, so the thread that will train is
        never lowered (an unprivileged process could not raise it back)."""
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except (AttributeError, OSError):  # not Linux: a plain nice
            try:
                os.nice(10)
            except OSError:
                pass
        try:
            _warm_imports()
            self._prepared = self._prepare()
        except Exception:  # the rank builds its own when promoted; nothing is lost
            self._prepared = None
        finally:
            self._warm.set()

    def _prepare(self):
        """A spare builds its model and data now (on the CPU), so a promotion only connects them."""
        import torch

        from resilient.training.trainer import Trainer

        trainer = Trainer(self.spec, -1, self.world, self._base_dir(), torch.device("cpu"))
        trainer.prepare()
        return trainer

    def ping(self) -> int:
        """Answers once this worker is warm (a spare: imports, data and model ready)."""
        self._warm.wait()
        return os.getpid()

    def info(self, rank: int | None = None, attempt: int | None = None) -> dict:
        """Where this worker runs (and a free port for rank 0's rendezvous); a spare takes its rank here."""
        from resilient.agents.rendezvous import free_port, node_ip

        if rank is not None:
            self._warm.wait()  # a spare promoted before it is warm (no other choice) finishes warming first
            self.rank, self.attempt = rank, attempt
            self._set(rank=rank)
        ip = node_ip()
        return {"rank": self.rank, "pid": os.getpid(), "ip": ip, "port": free_port(ip),
                "node_id": ray.get_runtime_context().get_node_id()}

    def start(self, master_ip: str, master_port: int, restore: dict | None, fired: list[int],
              base_ref: str, agent, skip: list[int], node_index: int = -1) -> None:
        """Train in the background. `restore` = {step, tier, agent} names the snapshot to resume
        from (None: from scratch); `agent` is this node's NodeAgent; `skip` lists data steps that
        rollbacks took out of the data order."""
        self.agent, self.skip, self.node_index = agent, set(skip), node_index
        if agent is not None:
            agent.register.remote(self.rank, os.getpid())
        args = (master_ip, master_port, restore, set(fired), base_ref)
        threading.Thread(target=self._main, args=args, daemon=True, name=f"train-rank{self.rank}").start()

    def heartbeat(self) -> dict:
        with self._lock:
            out = dict(self.status)
        engine = getattr(self, "engine", None)
        out["checkpoints"] = engine.drain_records() if engine else []
        out["snapshot_step"] = engine.latest.step if engine and engine.latest else None
        with self._lock:
            out["metrics"], self.metrics = self.metrics, []
        out["now"] = time.time()
        return out

    def flush(self) -> int | None:
        """Hand this rank's newest snapshot to its node agent now (a survivor, before a restart)."""
        engine = getattr(self, "engine", None)
        return engine.flush() if engine else None

    def request_stop(self) -> None:
        self._stop.set()

    def inject(self, fault: str, params: dict) -> None:
        """Chaos from outside (timed, random or `resilient chaos inject`): carried out on this process."""
        from resilient.config import ChaosEntry

        c = ChaosEntry(at_step=1, fault=fault, rank=self.rank, **params)
        if fault == "slow":
            self.slow = c.factor
        elif fault == "nan":
            self._poison_next = True
        elif fault in GPU_FAULTS:
            self._gpu_fault_pending = c  # the training thread meets it at its next step
        else:
            inject(fault)

    def _set(self, **kw: Any) -> None:
        with self._lock:
            self.status.update(kw)

    # -- the training thread ---------------------------------------------------------------------
    def _main(self, master_ip, master_port, restore, fired, base_ref) -> None:
        try:
            self._train(master_ip, master_port, restore, fired, base_ref)
        except BaseException as e:  # reported, never raised: the supervisor decides
            self._set(phase="error", error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")

    def _device(self):
        import torch

        if self._backend() == "nccl":
            return torch.device("cuda", 0)
        return torch.device("cpu")

    def _backend(self) -> str:
        b = self.spec.cluster.backend
        if b == "auto":
            return "nccl" if self.spec.cluster.resources_per_worker.get("GPU", 0) > 0 else "gloo"
        return b

    def _base_dir(self) -> str:
        if self.spec.model.path:
            return self.spec.model.path
        if self.rundir.is_local:
            return self.rundir.local_path("base_model")
        local = os.path.join(tempfile.gettempdir(), "resilient-base", self.rundir.root.replace("/", "_"))
        if not os.path.exists(os.path.join(local, "config.json")):
            self.rundir.download_dir("base_model", local)
        return local

    def _train(self, master_ip, master_port, restore, fired, base_ref) -> None:
        import torch

        from resilient.agents.rendezvous import init_process_group, node_ip
        from resilient.checkpoint import engine as ckpt_engine
        from resilient.training.trainer import Trainer, export_to

        spec = self.spec
        cpus = spec.cluster.resources_per_worker.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))
        self._set(phase="rendezvous")
        init_process_group(self._backend(), master_ip, master_port, self.rank, self.world,
                           spec.supervisor.collective_timeout, node_ip())
        self._set(phase="loading")
        trainer, self._prepared = self._prepared, None
        if trainer is None:
            trainer = Trainer(spec, self.rank, self.world, self._base_dir(), self._device())
            trainer.prepare()
        trainer.rank, trainer.device = self.rank, self._device()
        trainer.connect()
        cc = spec.checkpoint
        self.engine = engine = ckpt_engine.CheckpointEngine(self.agent, spec.fingerprint(), cc.persist_every,
                                                            cc.every, self.rank, cc.handoff_s)
        step = data_step = 0
        if restore:
            self._set(phase="restoring")
            t0 = time.perf_counter()
            snap = ckpt_engine.load(restore, self.store, spec.fingerprint())
            trainer.restore(snap)
            step, data_step = snap.step, snap.data_step
            self._set(restore_s=time.perf_counter() - t0)
        self._set(phase="training", step=step, restored_step=step, training_at=time.time())
        restored, total = step, spec.train.steps
        while step < total:
            poison = self._maybe_inject(step + 1, fired) or self._poison_next
            self._poison_next = False
            if self._gpu_fault_pending is not None:
                c, self._gpu_fault_pending = self._gpu_fault_pending, None
                self._gpu_fault(c)
            next_data = data_step + 1
            while next_data in self.skip:
                next_data += 1
            r = trainer.step(next_data, stop=self._stop.is_set(), poison=poison, slow=self.slow)
            now = time.time()
            rec = {"t": now, "rank": self.rank, "step": step + 1, "data_step": next_data, "loss": r.loss,
                   "mean_loss": r.mean_loss, "grad_norm": r.grad_norm, "step_time": r.step_time,
                   "compute_s": r.compute_s, "data_wait": r.data_wait, "attempt": self.attempt,
                   "tokens_per_s": r.tokens / max(r.step_time + r.data_wait, 1e-9)}
            with self._lock:
                self.metrics.append(rec)
                if len(self.metrics) > 5000:  # nobody is draining them: keep the newest
                    del self.metrics[:-5000]
            if r.nonfinite:  # no rank applied this update; the supervisor rolls back and skips the batch
                self._set(phase="nonfinite", nonfinite_step=step + 1, nonfinite_data_step=next_data)
                return
            step, data_step = step + 1, next_data
            self._set(step=step, loss=r.loss, mean_loss=r.mean_loss, grad_norm=r.grad_norm, step_time=r.step_time,
                      tokens_per_s=rec["tokens_per_s"], step_done_at=now)
            if step == restored + 1:
                self._set(first_step_done_at=now)
            final = step == total or r.stop
            if step % cc.every == 0 or final:
                engine.save(trainer, step, data_step, final)
            if engine.error:
                raise RuntimeError(engine.error)
            if r.stop:
                break
        if self.rank == 0:
            self._set(phase="persisting")
            engine.finish(step, cc.persist_timeout)  # durable before the job may report its end
            if step == total:
                self._set(phase="exporting")
                export_to(self.rundir, trainer, "final", base_ref)
        self._set(phase="done" if step == total else "stopped")

    def _maybe_inject(self, step: int, fired: set[int]) -> bool:
        """Fire this rank's planned process faults due at `step`; True if this step's loss must be NaN."""
        poison = False
        for i, c in enumerate(self.spec.chaos):
            if i in fired or c.at_step != step:
                continue
            if c.fault not in PROCESS_FAULTS and c.fault not in GPU_FAULTS:
                # Job-wide faults (storage, checkpoints, the supervisor) are the supervisor's to carry
                # out; rank 0 holds the job at this step until it has, so "at_step" means this step.
                if self.rank == 0:
                    fired.add(i)
                    self._ask_supervisor(i)
                continue
            mine = (c.node == self.node_index) if c.node is not None else c.target_rank == self.rank
            if not mine:
                continue
            fired.add(i)
            try:  # the marker keeps a restarted group from firing it again; best effort if storage is down
                self.rundir.write_json(f"chaos/fired-{i:04d}.json", {
                    "index": i, "fault": c.fault, "rank": self.rank, "step": step, "injected_at": time.time()})
            except Exception:
                pass
            if c.fault == "slow":
                self.slow = c.factor
            elif c.fault == "nan":
                poison = True
            elif c.fault in GPU_FAULTS:
                self._gpu_fault(c)
            else:
                inject(c.fault)
        return poison

    def _ask_supervisor(self, index: int, timeout: float = 60.0) -> None:
        self._chaos_ack.clear()
        self._set(chaos_request=index)
        self._chaos_ack.wait(timeout)
        self._set(chaos_request=None)

    def chaos_done(self) -> None:
        """The supervisor carried out the job-wide fault this rank asked for."""
        self._chaos_ack.set()

    def _gpu_fault(self, c) -> None:
        """Break this node's simulated GPU; a fault that would kill the CUDA context kills this rank's step."""
        ray.get(self.agent.gpu_fault.remote(c.fault, 0, xid=c.xid, count=c.count, temperature=c.temperature))
        from resilient.anomaly.detectors import XID_ACTIONS

        fatal = c.fault in ("gpu_lost", "ecc") or (c.fault == "gpu_xid" and c.xid in XID_ACTIONS)
        if fatal:
            raise RuntimeError(f"simulated {c.fault}{f' XID {c.xid}' if c.fault == 'gpu_xid' else ''}: "
                               "the GPU this rank runs on failed")
