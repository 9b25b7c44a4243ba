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


def uses_spares(spec: JobSpec) -> bool:
    """Warm spares need no reserved device: CPU jobs only (a GPU is only visible to an actor that holds it)."""
    return spec.supervisor.warm_spares and not spec.cluster.resources_per_worker.get("GPU")


def new_worker(spec: JobSpec, run_uri: str, node: str, rank: int, attempt: int):
    """A TrainWorker pinned to `node` (rank -1: a spare). With spares, workers reserve no CPU in Ray's
    accounting, since placement is ours (`nodes.assign`) and an idle spare must not block a rank."""
    opts = {"num_cpus": 0} if uses_spares(spec) else split_resources(spec.cluster.resources_per_worker)
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return TrainWorker.options(scheduling_strategy=strategy, max_restarts=0, max_concurrency=4, **opts).remote(
        spec.model_dump(), rank, run_uri, attempt)


class SparePool:
    """Warm spare workers, per node: started (imports done, data and model built) before they are
    needed, so no process start, torch import or model build sits on the recovery path. `fill(nodes)`
    tops the pool up without waiting; `take(node)` hands out a spare on that node (a warm one first)."""

    def __init__(self, spec: JobSpec, run_uri: str):
        self.spec, self.run_uri = spec, run_uri
        self.spares: dict[str, list[tuple[object, ray.ObjectRef]]] = {}

    def fill(self, nodes: list[str]) -> None:
        want: dict[str, int] = {}
        for n in nodes:
            want[n] = want.get(n, 0) + 1
        for n, k in want.items():
            have = self.spares.setdefault(n, [])
            for _ in range(k - len(have)):
                w = new_worker(self.spec, self.run_uri, n, -1, -1)
                have.append((w, w.ping.remote()))

    def take(self, node: str):
        """A spare on `node`: a warm one if any; else one still warming up, which has a head start
        over a process started now (its model is half built); None if the node has none."""
        have = self.spares.get(node, [])
        warming = None
        for entry in list(have):
            w, ready = entry
            done, _ = ray.wait([ready], timeout=0)
            if not done:
                warming = warming or entry
                continue
            have.remove(entry)
            try:
                ray.get(ready)
                return w
            except RayActorError:  # died with its node
                continue
        if warming is not None:
            have.remove(warming)
            return warming[0]
        return None

    def shutdown(self) -> None:
        for have in self.spares.values():
            for w, _ in have:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:
                    pass
        self.spares.clear()


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
        self._here = _local_ips()  # ranks at these addresses run on this machine (pid watch, SIGKILL)

    def start(self, restore: dict | None, fired: list[int], base_ref: str, agent_for, skip: list[int],
              node_index=lambda node_id: -1, spares=None) -> None:
        """Create, rendezvous and start the ranks; `agent_for(node_id)` gives a node's NodeAgent."""
        for rank in range(self.spec.cluster.num_workers):
            node = self.placement[rank]
            w = spares.take(node) if spares else None
            self.workers.append(w or new_worker(self.spec, self.rundir.uri, node, rank, self.attempt))
        refs = [w.info.remote(rank, self.attempt) for rank, w in enumerate(self.workers)]
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
        self._check_local_pids()  # every tick: a SIGKILLed rank is seen within one tick, not one heartbeat
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

    def _check_local_pids(self) -> None:
        """A rank on this machine whose process is gone is dead now; Ray takes ~0.5 s to say so."""
        for rank, info in enumerate(self.infos):
            if rank in self.dead or info["ip"] not in self._here:
                continue
            try:
                gone = psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                gone = True
            if gone:
                self.dead[rank] = f"the worker process {info['pid']} of rank {rank} is gone"

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

    def flush_newest(self, answers: dict[int, dict], timeout: float = 5.0) -> dict | None:
        """Have the survivor holding the newest snapshot (by `answers`, the final heartbeats) hand it
        to its node agent, so the restart restores it; {rank, step, seconds} or None if none could."""
        order = sorted(((h["snapshot_step"], rank) for rank, h in answers.items()
                        if h.get("snapshot_step") is not None), reverse=True)
        deadline = time.time() + timeout
        for _, rank in order:
            t0 = time.time()
            try:
                step = ray.get(self.workers[rank].flush.remote(), timeout=max(0.1, deadline - t0))
            except Exception:  # died or stuck meanwhile: the next survivor
                continue
            return {"rank": rank, "step": step, "seconds": round(time.time() - t0, 4)}
        return None

    def request_stop(self) -> None:
        for w in self.workers:
            w.request_stop.remote()

    def shutdown(self) -> None:
        # ray.kill asks the worker to exit first, which a SIGSTOPped process never does; where the
        # rank runs on this machine, SIGKILL it directly so teardown does not wait for Ray's fallback.
        for info in self.infos:
            if info["ip"] in self._here:
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
