"""Starting TrainWorkers on a node, and warm spares.

Contract: `new_worker()` starts a TrainWorker pinned to a node (hard node affinity). A `SparePool`
keeps spare workers per node, started before they are needed (imports done, data and model built
on an idle-priority thread), so a restart starts no process and builds no model: `fill(nodes)`
tops the pool up without waiting, `take(node)` hands out a spare (a warm one first).
"""

from __future__ import annotations

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resilient.agents.worker import TrainWorker
from resilient.config import JobSpec


def split_resources(res: dict[str, float]) -> dict:
    """Ray actor options for a bundle: CPU and GPU by name, the rest as custom resources."""
    other = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
    return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "resources": other}


def uses_spares(spec: JobSpec) -> bool:
    """Warm spares need no reserved device: CPU jobs only (a GPU is only visible to an actor that
    holds it)."""
    return spec.supervisor.warm_spares and not spec.cluster.resources_per_worker.get("GPU")


def new_worker(spec: JobSpec, run_uri: str, node: str, rank: int, attempt: int):
    """A TrainWorker pinned to `node` (rank -1: a spare). With spares, workers reserve no CPU in
    Ray's accounting, since placement is ours (`nodes.assign`) and an idle spare must not block a
    rank."""
    opts = (
        {"num_cpus": 0} if uses_spares(spec) else split_resources(spec.cluster.resources_per_worker)
    )
    strategy = NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    return TrainWorker.options(
        scheduling_strategy=strategy, max_restarts=0, max_concurrency=4, **opts
    ).remote(spec.model_dump(), rank, run_uri, attempt)


class SparePool:
    """Warm spare workers, per node (see the module contract)."""

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
