"""The fault catalogue: every fault `resilient` survives, by name, as used by `[[chaos]]` entries,
the random-chaos flags, `resilient chaos inject` and the tests; and `PlannedFault`, one entry of a
job's plan as the workers receive it.

Contract: a leaf module (it imports nothing of resilient), so the spec's validation and every layer
above may use it. `FAULTS[name]` says what the fault aims at ("rank", "node" or "job") and who
carries it out ("worker": the rank's own process; "agent": the node's NodeAgent; "supervisor": the
driver, through the chaos controller).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FaultType:
    name: str
    target: str  # rank | node | job
    by: str  # worker | agent | supervisor
    doc: str


FAULTS = {
    f.name: f
    for f in (
        FaultType("kill", "rank", "worker", "the rank's process dies by SIGKILL"),
        FaultType("exit", "rank", "worker", "the rank's process exits with code 1"),
        FaultType("hang", "rank", "worker", "the rank's process is stopped with SIGSTOP"),
        FaultType("slow", "rank", "worker", "the rank's compute takes `factor` times longer"),
        FaultType("nan", "rank", "worker", "the rank's loss becomes NaN at that step"),
        FaultType(
            "bitflip",
            "rank",
            "worker",
            "one low bit of one trainable parameter of the rank flips (silent corruption)",
        ),
        FaultType(
            "bad_compute",
            "node",
            "worker",
            "from its step on, the node (`node`, or the one `rank` runs on) computes subtly "
            "wrong: its preflight check fails and its ranks' gradients are off by a part in 2^10",
        ),
        FaultType(
            "node_loss",
            "rank",
            "worker",
            "the raylet of the rank's node is killed (multi-node clusters)",
        ),
        FaultType("gpu_xid", "node", "agent", "the simulated GPU reports XID `xid`"),
        FaultType("gpu_lost", "node", "agent", "the simulated GPU stops answering (GPU is lost)"),
        FaultType("ecc", "node", "agent", "`count` uncorrectable ECC errors on the simulated GPU"),
        FaultType(
            "thermal", "node", "agent", "the simulated GPU runs at `temperature`, throttling"
        ),
        FaultType(
            "storage_outage",
            "job",
            "agent",
            "checkpoint storage refuses every write for `seconds`",
        ),
        FaultType(
            "corrupt_checkpoint",
            "job",
            "supervisor",
            "the newest persisted checkpoint's bytes are damaged",
        ),
        FaultType(
            "supervisor_kill",
            "job",
            "supervisor",
            "the supervisor (driver) dies; `launch --resume` goes on",
        ),
    )
}
PROCESS = tuple(n for n, f in FAULTS.items() if f.by == "worker")  # done by the rank's process
GPU = ("gpu_xid", "gpu_lost", "ecc", "thermal")  # set on a node's simulated GPU
JOB = tuple(n for n, f in FAULTS.items() if f.target == "job")  # carried out by the supervisor side
RANDOM = tuple(n for n, f in FAULTS.items() if f.target == "rank" and n != "node_loss") + (
    "bad_compute",  # drawn for a rank: its node goes bad
)
NODE_OR_RANK = ("bad_compute",)  # node faults that may also be aimed as "the node of `rank`"
RANDOM_DEFAULT = ("kill", "exit", "hang")  # what `--chaos-mtbf` draws unless told otherwise
PARAMS = ("factor", "xid", "count", "temperature", "seconds")  # a fault's parameters, by name


@dataclass(frozen=True)
class PlannedFault:
    """A `[[chaos]]` entry with an `at_step` that has not fired yet, as the workers receive it.

    The rank it aims at (or, with `node`, every rank on that node) fires it at the start of `step`.
    A `job`-wide fault is the supervisor's: rank 0 holds the job at `step` until it is carried out.
    `fatal`: a GPU fault that would kill the CUDA context also fails the step of the ranks there.
    """

    index: int
    step: int
    fault: str
    rank: int | None = None
    node: int | None = None
    params: dict = field(default_factory=dict)
    fatal: bool = False

    @property
    def job_wide(self) -> bool:
        return self.fault in JOB

    def aims_at(self, rank: int, node_index: int) -> bool:
        if self.node is not None:
            return self.node == node_index
        return self.rank == rank
