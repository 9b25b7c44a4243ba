"""Carrying out a fault on a running job, from the supervisor: timed and random chaos, and requests
written by `resilient chaos inject` into the run directory's control folder.

Contract: `carry_out(sup, group, fault, rank, node, params)` injects the fault for real (signals
through the rank's own process, the node agent's simulated GPU or storage, the checkpoint bytes, or
this very driver) and returns the record to journal. Requests are files `control/inject-<id>.json`
holding {fault, rank, node, params}; each is carried out once and acknowledged in the journal.
"""
from __future__ import annotations

import os
import signal
import time

from resilient.chaos.catalogue import FAULTS, GPU
from resilient.checkpoint.storage import ckpt_dir

REQUESTS = "control"


def carry_out(sup, group, fault: str, rank: int | None, node: int | None, params: dict, index=None) -> dict:
    ft = FAULTS[fault]
    rec = {"index": index, "fault": fault, "rank": rank, "node": None, "injected_at": time.time(), "step": sup.step + 1}
    if ft.target == "rank" or (fault in GPU and node is None):
        rank = 0 if rank is None else rank
        rec["rank"] = rank
        if not 0 <= rank < len(group.workers):
            raise ValueError(f"rank {rank} does not exist")
    if fault in GPU:
        node_id = sup.nodes.node_at(node) if node is not None else group.placement[rank]
        rec["node"] = node_id
        on_node = [r for r, n in enumerate(group.placement) if n == node_id]
        if on_node:  # the ranks on that GPU see the failure in their next step
            for r in on_node:
                group.workers[r].inject.remote(fault, params)
        else:
            sup.nodes.agent_for(node_id).gpu_fault.remote(fault, 0, **params)
    elif ft.by == "worker":
        group.workers[rank].inject.remote(fault, params)
    elif fault == "storage_outage":
        for agent in sup.nodes.agents.values():
            agent.storage_outage.remote(params.get("seconds", 5.0))
    elif fault == "corrupt_checkpoint":
        rec["damaged_step"] = corrupt_newest(sup)
        if rec["damaged_step"] is None:
            raise ValueError("no checkpoint to damage yet")
    elif fault == "supervisor_kill":  # marker first: the resumed supervisor must not fire it again
        sup.rundir.write_json(marker(index), rec)
        sup.journal.append("chaos", **rec)
        os.kill(os.getpid(), signal.SIGKILL)
    return rec


def marker(index) -> str:
    return f"chaos/fired-{str(index).replace('/', '_')}.json"


def corrupt_newest(sup) -> int | None:
    """Damage the newest checkpoint: flip bytes in every copy of it (storage, memory, peer replica)."""
    import ray

    in_memory = []
    for agent in sup.nodes.agents.values():
        try:
            in_memory += [e["step"] for e in ray.get(agent.inventory.remote(), timeout=10)]
        except Exception:
            pass
    persisted = sup.store.steps()
    step = max(in_memory + persisted, default=None)
    if step is None:
        return None
    if step in persisted:
        path = f"{ckpt_dir(step)}/shared.safetensors"
        data = bytearray(sup.rundir.read_bytes(path))
        data[len(data) // 2] ^= 0xFF
        sup.rundir.write_bytes(path, bytes(data))
    ray.get([agent.corrupt.remote(step) for agent in sup.nodes.agents.values()], timeout=10)
    return step


def pending_requests(rundir) -> list[tuple[str, dict]]:
    out = []
    for name in rundir.listdir(REQUESTS):
        if name.startswith("inject-") and name.endswith(".json"):
            try:
                out.append((name[7:-5], rundir.read_json(f"{REQUESTS}/{name}")))
            except Exception:  # half-written: next time
                continue
    return out
