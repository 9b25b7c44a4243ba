"""TrainWorker: the Ray actor of one rank.

Contract: `start()` returns at once and trains in a background thread, so `heartbeat()` is answered
while a step runs (the actor is threaded); the `Heartbeat` is the supervisor's only window into the
rank. Chaos (planned faults at their step, `inject()` from outside) is `chaos_damage.ChaosDamage`;
the step loop, snapshots and the end of a life are `training_loop.TrainingLoop`.

Survivors: when its training thread ends on an error (a dead peer breaks every collective), the
worker leaves the process group (destroying it, which frees peers blocked on this rank) and keeps
its trainer: `leave(timeout)` says whether the thread ended, and a later `start()` on a new
rendezvous (new master port, possibly another world size) reuses the model, restoring the agreed
snapshot from its own memory when it holds that step. `request_pause()` ends training at the next
step every rank agrees on, with that step's snapshot handed to the node agent (phase "paused": the
supervisor resizes the job there).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import ray

from resilient.agents import rendezvous as rdv
from resilient.agents.chaos_damage import ChaosDamage
from resilient.agents.heartbeat import Heartbeat
from resilient.agents.lease import Lease
from resilient.agents.output import capture
from resilient.agents.priority import lower_main_thread
from resilient.agents.reports import Reports
from resilient.agents.store import KeyValue, on_worker, ray_store
from resilient.agents.trainers import TrainerSource
from resilient.agents.training_loop import TrainingLoop
from resilient.agents.warmup import warm_imports
from resilient.catalogue import PlannedFault
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import JobSpec
from resilient.rundir import RunDir

if TYPE_CHECKING:  # torch comes with it: a spare imports that on its idle-priority thread
    from resilient.checkpoint.source import RestoreSource

log = logging.getLogger(__name__)

# what a collective says when a peer died or stopped answering (gloo's and NCCL's words)
PEER_SIGNS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "NCCL communicator was aborted",
)


def peer_broke(e: BaseException) -> bool:
    """Whether `e` is a collective that broke because a peer died or hung (by its words: a
    backend error of this rank's own, a CUDA or NCCL failure here, keeps its traceback)."""
    return any(s in str(e) for s in PEER_SIGNS)


@ray.remote(max_concurrency=4, concurrency_groups={"lease": 1, "store": 16})
class TrainWorker(ChaosDamage, TrainingLoop):
    def __init__(self, spec: JobSpec, rank: int, run_uri: str, attempt: int):
        """`rank = -1` makes a warm spare: it prepares, then waits for `info(rank, attempt)`.
        `spec` comes validated (validating it again would import peft here, at full priority)."""
        self.output = capture()  # before anything prints: every line reaches logs/rank-N.log
        self.spec = spec
        if rank >= 0:
            warm_imports()
        self.rank, self.world, self.attempt = rank, self.spec.cluster.num_workers, attempt
        self.rundir = RunDir(run_uri, self.spec.checkpoint.storage_options)
        self.store = CheckpointStore(self.rundir)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._thread: threading.Thread | None = None
        self._trainer_now = None  # the trainer of the running life, once connected
        self._data_step = 0  # the data step of the last step trained
        self._agreed_pause = False  # every rank agreed to pause after the last step
        self.reports = Reports()  # per-step records and evaluations, drained by the heartbeat
        self.engine = None
        self.slow = 1.0
        self.bad_compute = False  # chaos bad_compute: this node computes wrong (for good)
        self._injected: list[tuple[str, dict, bool]] = []  # faults met at the next step
        self._chaos_ack = threading.Event()
        self.status: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "phase": "created"}
        self._kv = None  # rank 0: the rendezvous store of the current life
        self.trainers = TrainerSource(spec, self.rundir)
        # cut off from the supervisor for fence_s: replaced already, so end (see agents.lease)
        self.lease = Lease(spec.supervisor.fence_s, lambda: os._exit(1))
        if rank < 0:  # a spare warms up on a thread of its own, at low priority
            warm = self.trainers.warm_up
            threading.Thread(target=warm, daemon=True, name="spare-warm-up").start()
        else:
            self.trainers.ready.set()

    @ray.method(concurrency_group="lease")  # a thread of its own: never queued behind work
    def renew(self, sent_at: float) -> bool:
        return self.lease.renew(sent_at)

    @ray.method(concurrency_group="store")
    def kv(self, op: str, *args):
        """Rank 0 serves the rendezvous's keys (agents.store) from here."""
        return getattr(self._kv, op)(*args)

    def ping(self) -> int:
        """Answers once this worker is warm (a spare: imports, data and model ready)."""
        lower_main_thread()  # a spare's first call (agents.priority)
        self.trainers.ready.wait()
        return os.getpid()

    def info(self, rank: int | None = None, attempt: int | None = None) -> dict:
        """Where this worker runs (and a free port for rank 0's rendezvous); a spare takes its
        rank here."""
        lower_main_thread()  # a rank's first call (agents.priority)
        if rank is not None:
            self.trainers.ready.wait()  # a spare promoted before it is warm finishes warming
            self.rank, self.attempt = rank, attempt
            self._set(rank=rank)
        ip = rdv.node_ip()
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "ip": ip,
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpus": [int(g) if str(g).isdigit() else g for g in ray.get_gpu_ids()],
        }

    def start(
        self,
        master,
        restore: RestoreSource | None,
        plan: tuple[PlannedFault, ...],
        base_ref: str,
        agent,
        skip: list[int],
        node_index: int = -1,
        world: int | None = None,
    ) -> None:
        """Train in the background from `restore` (None: from scratch). `plan`: the planned faults
        still to fire; `agent`: this node's NodeAgent; `skip`: data steps rollbacks took out;
        `world`: the number of ranks (default `cluster.num_workers`); `master`: rank 0's worker,
        whose store (agents.store) is the rendezvous. A survivor (its previous training thread
        ended) starts again the same way."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"rank {self.rank} still trains; leave() first")
        self.agent, self.skip, self.node_index = agent, set(skip), node_index
        self.world = world or self.spec.cluster.num_workers
        self.plan, self._fired = plan, set()
        self._stop.clear()
        self._pause.clear()
        self.slow, self._injected = 1.0, []  # chaos of the previous life ends with it
        with self._lock:  # a new life: nothing of the previous one is reported again
            self.status = {"rank": self.rank, "pid": os.getpid(), "phase": "created"}
        self.reports.clear()
        if agent is not None:
            agent.register.remote(self.rank, os.getpid())
        if self.rank == 0:  # a new rendezvous, served before the others start (the group)
            self._kv = KeyValue()
        args = (master, restore, base_ref)
        self._thread = threading.Thread(
            target=self._main, args=args, daemon=True, name=f"train-rank{self.rank}"
        )
        self._thread.start()

    def leave(self, timeout: float, drain: bool = False) -> bool:
        """Wait up to `timeout` for the training thread to end (a dead peer makes its collective
        fail); True when it did, so this worker can start again on a new rendezvous. `drain` (a
        rollback follows): also wait, within `timeout`, until every snapshot this rank queued is
        handed over, so none of the abandoned timeline lands after the rollback forgot it."""
        deadline = time.monotonic() + timeout
        t = self._thread
        if t is not None:
            t.join(timeout)
        if t is not None and t.is_alive():
            return False
        if drain and self.engine is not None:
            return self.engine.drain(max(0.0, deadline - time.monotonic()))
        return True

    def request_pause(self) -> None:
        """End training at the next agreed step boundary, its snapshot handed over (a resize)."""
        self._pause.set()

    def heartbeat(self) -> Heartbeat:
        engine = self.engine
        with self._lock:
            status = dict(self.status)
        metrics, evals = self.reports.drain()
        return Heartbeat(
            **status,
            now=time.time(),
            metrics=metrics,
            evals=evals,
            checkpoints=tuple(engine.drain_records()) if engine else (),
            snapshot_step=engine.latest.step if engine and engine.latest else None,
            logs=self.output.drain(),
        )

    def flush(self) -> tuple[int | None, int | None]:
        """Hand this rank's newest snapshot to its node agent now (a survivor, before a restart);
        (its step, its size in bytes), (None, None) without one."""
        snap = self.engine.latest if self.engine else None
        step = self.engine.flush() if self.engine else None
        return step, (snap.nbytes if snap is not None and snap.step == step else None)

    def request_stop(self) -> None:
        self._stop.set()

    def _set(self, **kw: Any) -> None:
        with self._lock:
            self.status.update(kw)

    # -- the training thread ---------------------------------------------------------------------
    def _main(self, master, restore, base_ref) -> None:
        try:
            trainer, step, data_step = self._setup(master, restore)
            step = self._train(trainer, step, data_step)
            if step is not None and self._agreed_pause:
                self._paused(trainer, step)
            elif step is not None:
                self._finish(trainer, step, base_ref)
        except BaseException as e:  # reported, never raised: the supervisor decides
            if peer_broke(e):  # a survivor's lot, not its failure: one line, not a traceback
                why = str(e).split(". ")[0][:200]
                log.warning(
                    "rank %s: a collective broke (%s); the supervisor decides", self.rank, why
                )
                log.debug("the broken collective", exc_info=True)
            else:
                log.exception("rank %s failed", self.rank)  # the whole traceback, in its log
            self._set(
                phase="error",
                error=f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}",
                error_at=time.time(),
            )
        finally:
            self._leave_group()

    def _leave_group(self) -> None:
        """Leave the process group (closing its connections frees peers blocked on this rank);
        the model stays, for a start() on the next rendezvous."""
        from resilient.agents.rendezvous import leave_process_group

        trainer, self._trainer_now = self._trainer_now, None
        if trainer is not None:
            trainer.ddp = None  # DDP's reducer holds the group: let it go with it
            self.trainers.keep(trainer)
        try:
            broken = self.status.get("phase") == "error"
            leave_process_group(rdv.backend_of(self.spec.cluster), broken=broken)
        except Exception:  # a broken group may refuse a clean teardown; it is dropped anyway
            log.warning("rank %s: process group teardown failed", self.rank, exc_info=True)
        gc.collect()

    def _timeout(self) -> float:
        return self.spec.supervisor.collective_timeout

    def _setup(self, master, restore: RestoreSource | None):
        """Join the process group (through the store of rank 0, `master`), build (or take the
        prepared) trainer, restore; (trainer, step, data step) to go on from."""
        import torch

        from resilient.checkpoint.engine import CheckpointEngine
        from resilient.checkpoint.source import load

        spec, cc = self.spec, self.spec.checkpoint
        torch.set_num_threads(max(1, int(spec.cluster.resources_per_worker.get("CPU", 1))))
        self._set(phase="rendezvous")
        call = self.kv if self.rank == 0 else on_worker(master)
        store = ray_store(call, self._timeout())
        backend, device = rdv.backend_of(spec.cluster), rdv.device_of(spec.cluster)
        rdv.init_process_group(
            backend, store, self.rank, self.world, self._timeout(), rdv.node_ip()
        )
        self._set(phase="loading")
        t_load = time.perf_counter()
        trainer, warm = self.trainers.take(restore, self.rank, self.world, device)
        trainer.rank, trainer.world, trainer.device = self.rank, self.world, device
        trainer.connect()
        self._trainer_now = trainer
        if self.engine is None or self.engine.error or self.engine.rank != self.rank:
            self.engine = CheckpointEngine(
                self.agent, spec.fingerprint(), cc.persist_every, cc.every, self.rank, cc.handoff_s
            )
        self.engine.agent = self.agent  # a survivor's engine: the agent of the node it is on
        step = data_step = 0
        if restore:
            self._set(phase="restoring")
            t0 = time.perf_counter()
            own = self.engine.latest  # a survivor restores the agreed step from its own memory
            if own is not None and own.step == restore.step:
                snap = own
            else:
                snap = load(restore, self.store, spec.fingerprint())
                self.engine.rewind()  # a rollback survived: its newer snapshot is abandoned
            trainer.restore(snap)
            step, data_step = snap.step, snap.data_step
            self._set(restore_s=time.perf_counter() - t0)
        log.info(
            "rank %d (attempt %d) training from step %d: %s, ready in %.2fs after the rendezvous",
            self.rank,
            self.attempt,
            step,
            warm,
            time.perf_counter() - t_load,
        )
        self._data_step = data_step
        self._set(phase="training", step=step, training_at=time.time())
        return trainer, step, data_step
