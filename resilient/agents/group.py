"""WorkerGroup: the ranks of one attempt, placed, rendezvoused, started, polled and torn down.

Contract: `start()` creates one TrainWorker per rank on its assigned node and starts training
(raising `GroupStartError` with the cause if that fails). `poll(wait_s)` keeps one heartbeat in
flight per rank and returns what came back: a status dict per rank that answered, and the death
error of each rank whose actor died. `last_answer[rank]` says when a rank last answered.
`shutdown()` kills every rank (SIGKILL also ends a SIGSTOPped process).
"""
from __future__ import annotations

import os
import signal
import socket
import time

import psutil

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resilient.agents.worker import TrainWorker
from resilient.config import JobSpec
from resilient.rundir import RunDir


class GroupStartError(Exception):
    def __init__(self, message: str, rank: int | None = None, dead: bool = False):
        super().__init__(message)
        self.rank, self.dead = rank, dead


def split_resources(res: dict[str, float]) -> dict:
    """Ray actor options for a bundle: CPU and GPU by name, the rest as custom resources."""
    other = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "resources": other}


class WorkerGroup:
    def __init__(self, spec: JobSpec, rundir: RunDir, placement: list[str], attempt: int):
        """`placement[rank]` is the node the rank must run on (hard affinity: cordoned nodes stay out)."""
        self.spec, self.rundir, self.placement, self.attempt = spec, rundir, placement, attempt
        self.workers: list = []
        self.infos: list[dict] = []
        self.pending: dict[int, ray.ObjectRef] = {}
        self.issued_at: dict[int, float] = {}
        self.last_answer: dict[int, float] = {}
        self.latest: dict[int, dict] = {}
        self.dead: dict[int, str] = {}
        self.data_steps: dict[int, set[int]] = {}  # step -> data steps the ranks trained on (rollback skips)

    def start(self, restore: dict | None, fired: list[int], base_ref: str, agent_for, skip: list[int],
              node_index=lambda node_id: -1) -> None:
        """Create, rendezvous and start the ranks; `agent_for(node_id)` gives a node's NodeAgent."""
        opts = split_resources(self.spec.cluster.resources_per_worker)
        spec_dict = self.spec.model_dump()
        for rank in range(self.spec.cluster.num_workers):
            strategy = NodeAffinitySchedulingStrategy(node_id=self.placement[rank], soft=False)
            self.workers.append(TrainWorker.options(scheduling_strategy=strategy, max_restarts=0,
                                                    max_concurrency=4, **opts)
                                .remote(spec_dict, rank, self.rundir.uri, self.attempt))
        refs = [w.info.remote() for w in self.workers]
        try:
            self.infos = ray.get(refs, timeout=self.spec.supervisor.start_timeout)
        except GetTimeoutError:
            raise GroupStartError(f"workers did not start within supervisor.start_timeout="
                                  f"{self.spec.supervisor.start_timeout}s") from None
        except RayActorError as e:
            rank = next((i for i, r in enumerate(refs) if _failed(r)), None)
            raise GroupStartError(f"a worker died while starting: {e}", rank=rank, dead=True) from None
        master = self.infos[0]
        ray.get([w.start.remote(master["ip"], master["port"], restore, fired, base_ref, agent_for(info["node_id"]), skip,
                                node_index(info["node_id"]))
                 for w, info in zip(self.workers, self.infos)])
        now = time.time()
        for rank in range(len(self.workers)):
            self.last_answer[rank] = now

    def node_of(self, rank: int) -> str | None:
        return self.infos[rank]["node_id"] if rank < len(self.infos) else None

    def poll(self, wait_s: float) -> None:
        """Issue due heartbeats, wait up to `wait_s` for answers, record them in latest/dead/last_answer."""
        now = time.time()
        interval = self.spec.supervisor.heartbeat_interval
        for rank, w in enumerate(self.workers):
            if rank in self.dead or rank in self.pending:
                continue
            if now - self.issued_at.get(rank, 0) >= interval:
                self.pending[rank] = w.heartbeat.remote()
                self.issued_at[rank] = now
        if not self.pending:
            time.sleep(wait_s)
            return
        by_ref = {ref: rank for rank, ref in self.pending.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=wait_s)
        for ref in ready:
            rank = by_ref[ref]
            del self.pending[rank]
            try:
                self.latest[rank] = ray.get(ref)
                self.last_answer[rank] = time.time()
            except RayActorError as e:
                self.dead[rank] = str(e).splitlines()[0][:300]

    def final_heartbeats(self, timeout: float = 1.0) -> dict[int, dict]:
        """One last heartbeat from every rank still answering (before a teardown), so what the
        survivors did since the previous heartbeat (metrics, checkpoints) is not lost."""
        refs = {rank: (self.pending.pop(rank, None) or w.heartbeat.remote()) for rank, w in enumerate(self.workers)
                if rank not in self.dead}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout) if refs else ([], [])
        out = {}
        for rank, ref in refs.items():
            if ref in ready:
                try:
                    out[rank] = ray.get(ref)
                except RayActorError:
                    pass
        return out

    def request_stop(self) -> None:
        for w in self.workers:
            w.request_stop.remote()

    def shutdown(self) -> None:
        # ray.kill asks the worker to exit first, which a SIGSTOPped process never does; where the
        # rank runs on this machine, SIGKILL it directly so teardown does not wait for Ray's fallback.
        here = _local_ips()
        for info in self.infos:
            if info["ip"] in here:
                try:
                    os.kill(info["pid"], signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for w in self.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        self.workers = []


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True


def _local_ips() -> set[str]:
    return {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
