"""The chaos port: the narrow interface through which the supervisor lets chaos into a job.

Contract: the supervisor calls a `ChaosHooks` at four named points and nowhere else:
`preflight(nodes)` before the nodes are checked (node faults planned for the first step are put in
place; the node ids it returns compute wrong from now on), `plan(restored, size)` when an attempt
starts after step `restored` with `size` ranks (the planned faults its workers must still fire),
`tick(view)` at every poll of the running group (timed and random chaos, `resilient chaos inject`
requests, job-wide faults rank 0 holds for, GPU faults on nodes without ranks), and
`attribute(fault)` before it acts on a fault (chaos adds when and at which step it was injected).
`JobView` is all chaos may see and touch. `NoChaos` does nothing; the chaos controller
(`resilient.chaos.controller`) is the real one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from resilient.agents.heartbeat import Heartbeat
from resilient.catalogue import PlannedFault
from resilient.checkpoint.storage import CheckpointStore
from resilient.supervisor.faults import Fault


@dataclass(frozen=True)
class JobView:
    """The running job, as chaos sees it at one poll."""

    step: int  # the last step every rank finished
    training_s: float  # seconds of training so far (the clock stops while the job restarts)
    running: bool  # the group is training (it became ready)
    heartbeats: Mapping[int, Heartbeat]  # each rank's newest
    group: Any  # the WorkerGroup: placement, size, workers, inject(rank, ...), release_chaos()
    nodes: Any  # the Nodes: node_at(index), agent_for(node), agents
    store: CheckpointStore


class ChaosHooks(Protocol):
    def preflight(self, nodes: Any) -> set[str]: ...

    def plan(self, restored: int = 0, size: int | None = None) -> tuple[PlannedFault, ...]: ...

    def tick(self, view: JobView) -> None: ...

    def attribute(self, fault: Fault) -> Fault: ...


class NoChaos:
    """A job without chaos."""

    def preflight(self, nodes: Any) -> set[str]:
        return set()

    def plan(self, restored: int = 0, size: int | None = None) -> tuple[PlannedFault, ...]:
        return ()

    def tick(self, view: JobView) -> None:
        pass

    def attribute(self, fault: Fault) -> Fault:
        return fault
