"""The fault catalogue: every fault `resilient` survives, by name, as used by `[[chaos]]` entries, the
random-chaos flags, `resilient chaos inject` and the tests.

Contract: `FAULTS[name]` says what the fault aims at ("rank", "node" or "job") and who carries it
out ("worker": the rank's own process; "agent": the node's NodeAgent; "supervisor": the driver).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FaultType:
    name: str
    target: str      # rank | node | job
    by: str          # worker | agent | supervisor
    doc: str


FAULTS = {f.name: f for f in (
    FaultType("kill", "rank", "worker", "the rank's process dies by SIGKILL"),
    FaultType("exit", "rank", "worker", "the rank's process exits with code 1"),
    FaultType("hang", "rank", "worker", "the rank's process is stopped with SIGSTOP"),
    FaultType("slow", "rank", "worker", "the rank's compute takes `factor` times longer"),
    FaultType("nan", "rank", "worker", "the rank's loss becomes NaN at that step"),
    FaultType("node_loss", "rank", "worker", "the raylet of the rank's node is killed (multi-node clusters)"),
    FaultType("gpu_xid", "node", "agent", "the simulated GPU reports XID `xid`"),
    FaultType("gpu_lost", "node", "agent", "the simulated GPU stops answering (GPU is lost)"),
    FaultType("ecc", "node", "agent", "`count` uncorrectable ECC errors on the simulated GPU"),
    FaultType("thermal", "node", "agent", "the simulated GPU runs at `temperature` and throttles"),
    FaultType("storage_outage", "job", "agent", "checkpoint storage refuses every write for `seconds`"),
    FaultType("corrupt_checkpoint", "job", "supervisor", "the newest persisted checkpoint's bytes are damaged"),
    FaultType("supervisor_kill", "job", "supervisor", "the supervisor (driver) dies; `launch --resume` goes on"),
)}
PROCESS = tuple(n for n, f in FAULTS.items() if f.by == "worker")
GPU = ("gpu_xid", "gpu_lost", "ecc", "thermal")
