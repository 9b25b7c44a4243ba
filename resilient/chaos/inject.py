"""Carrying out a fault on a running job from the driver's side, through what `JobView` exposes.

Contract: `aim(view, order)` checks that the fault can hit its target and returns the `FiredFault`
to record, with the step it lands in (a rank's own fault: asked of the rank, at most
`LANDING_ASK_S`; else the step after the job-wide one), raising ValueError, with the reason, when
it cannot (no such rank or node, no checkpoint to damage); it does no damage.
`strike(view, fired, params)` does the damage for real: through the rank's own process
(`WorkerGroup.inject`), a node agent's simulated GPU or persister, the checkpoint bytes (storage
and every memory copy), or this very driver (SIGKILL). Markers and the journal are the
controller's: it records a fault before it strikes.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from resilient.anomaly.detectors import XID_ACTIONS
from resilient.catalogue import FAULTS, GPU
from resilient.checkpoint.snapshot import SHARED
from resilient.checkpoint.storage import ckpt_dir
from resilient.rundir.markers import FiredFault
from resilient.supervisor.hooks import JobView

LANDING_ASK_S = 0.5  # the supervisor's loop waits this long at most for a rank that does not answer


def is_fatal(fault: str, params: dict) -> bool:
    """A GPU fault that would kill the CUDA context (and so the step of the ranks on that GPU)."""
    return fault in ("gpu_lost", "ecc") or (fault == "gpu_xid" and params.get("xid") in XID_ACTIONS)


@dataclass(frozen=True)
class Order:
    """One fault to carry out: what, at whom (a rank, or a node by index), with which parameters,
    and where it came from (a `[[chaos]]` entry or a `resilient chaos inject` request)."""

    key: str  # its marker key
    fault: str
    rank: int | None = None
    node: int | None = None
    params: dict = field(default_factory=dict)
    index: int | None = None
    request: str | None = None


def aim(view: JobView, order: Order) -> FiredFault:
    fault, rank, node = order.fault, order.rank, order.node
    if fault not in FAULTS:
        raise ValueError(f"{fault!r} is not in the fault catalogue")
    if FAULTS[fault].target == "rank" or (fault in GPU and node is None):
        rank = 0 if rank is None else rank
        if not 0 <= rank < view.group.size:
            raise ValueError(f"rank {rank} does not exist")
    node_id = None
    if fault in GPU:
        node_id = view.nodes.node_at(node) if node is not None else view.group.placement[rank]
        if node_id is None:
            raise ValueError(f"node {node} does not exist")
    damaged = None
    if fault == "corrupt_checkpoint":
        damaged = newest_checkpoint(view)
        if damaged is None:
            raise ValueError("no checkpoint to damage yet")
    step = view.step + 1
    if FAULTS[fault].by == "worker" and FAULTS[fault].target == "rank":
        step = _landing_step(view, rank, fault) or step
    return FiredFault(
        order.key,
        fault,
        time.time(),
        step=step,
        rank=rank,
        node=node_id,
        index=order.index,
        request=order.request,
        damaged_step=damaged,
    )


def _landing_step(view: JobView, rank: int, fault: str) -> int | None:
    """The step a fault struck on `rank` now lands in, asked of the rank: the job-wide step the
    supervisor knows lags up to a heartbeat interval (50 steps of 20 ms), which put the fault's
    step, and the steps it cost, that far off. None when the rank does not answer at once (a
    stopped process)."""
    try:
        ask = view.group.workers[rank].landing_step.remote(fault)
        return ray.get(ask, timeout=LANDING_ASK_S)
    except (GetTimeoutError, RayActorError):
        return None


def strike(view: JobView, fired: FiredFault, params: dict) -> None:
    fault = fired.fault
    if fault in GPU:
        on_node = [r for r, n in enumerate(view.group.placement) if n == fired.node]
        params = {**params, "key": fired.key}  # the GPU takes it once, however many ranks share it
        for r in on_node:  # the ranks on that GPU see the failure in their next step
            view.group.inject(r, fault, params, is_fatal(fault, params))
        if not on_node:
            view.nodes.agent_for(fired.node).gpu_fault.remote(fault, params)
    elif FAULTS[fault].by == "worker":
        view.group.inject(fired.rank, fault, params)
    elif fault == "storage_outage":
        for agent in view.nodes.agents.values():
            agent.storage_outage.remote(params.get("seconds", 5.0))
    elif fault == "corrupt_checkpoint":
        corrupt(view, fired.damaged_step)
    elif fault == "supervisor_kill":
        os.kill(os.getpid(), signal.SIGKILL)


def newest_checkpoint(view: JobView) -> int | None:
    """The newest snapshot anywhere: in a node agent's memory or persisted."""
    in_memory = []
    for agent in view.nodes.agents.values():
        try:
            in_memory += [e["step"] for e in ray.get(agent.inventory.remote(), timeout=10)]
        except Exception:  # an agent that is gone holds nothing
            pass
    return max(in_memory + view.store.steps(), default=None)


def corrupt(view: JobView, step: int) -> None:
    """Flip bytes in every copy of `step`: in storage and in every node agent's memory."""
    if step in view.store.steps():
        path = f"{ckpt_dir(step)}/{SHARED}"
        data = bytearray(view.store.rundir.read_bytes(path))
        data[len(data) // 2] ^= 0xFF
        view.store.rundir.write_bytes(path, bytes(data))
    ray.get([agent.corrupt.remote(step) for agent in view.nodes.agents.values()], timeout=10)
