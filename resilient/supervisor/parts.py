"""The supervisor's collaborators, injected: what it talks to, never what it builds itself.

Contract: `Parts` holds the checkpoint store, the node inventory, a factory of worker groups
(`new_group(placement, attempt)` gives a group not yet started), the anomaly monitor, the control
poller (stop requests), the chaos hooks, the spare pool, the clock and the node health watch.
`ray_parts()` builds the real ones on the connected Ray cluster; tests pass fakes of the same
shape.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resilient.agents.group import WorkerGroup
from resilient.agents.reservation import spares_wanted
from resilient.agents.spares import SparePool
from resilient.anomaly.monitor import AnomalyMonitor
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import JobSpec
from resilient.rundir import RunDir
from resilient.supervisor.health import NodeHealth
from resilient.supervisor.hooks import ChaosHooks, NoChaos
from resilient.supervisor.nodes import Nodes


@dataclass
class Parts:
    store: CheckpointStore
    nodes: Any  # Nodes, or a fake with its methods
    new_group: Callable[[list[str], int], Any]  # (placement, attempt) -> a WorkerGroup-like
    monitor: AnomalyMonitor
    control: Any  # has `stop_requested` and `close()` (rundir.control.ControlPoller)
    chaos: ChaosHooks = field(default_factory=NoChaos)
    spares: SparePool | None = None
    clock: Callable[[], float] = time.time
    health: NodeHealth | None = None  # lost and cut-off nodes (None: not watched)


def ray_parts(
    spec: JobSpec,
    rundir: RunDir,
    base_ref: str,
    control: Any,
    chaos: ChaosHooks | None = None,
    exporter: Any = None,
    trackers: Any = None,
) -> Parts:
    """The real collaborators (Ray must be connected); `base_ref` is what the final adapter names
    as its base model; `exporter` the Prometheus exporter the monitor feeds, if any; `trackers`
    the experiment trackers' feed (`anomaly.trackers.Feed`), if any."""
    nodes = Nodes(spec, rundir.uri)
    spares = SparePool(spec, rundir.uri, nodes.reservation) if spares_wanted(spec) else None

    def new_group(placement: list[str], attempt: int) -> WorkerGroup:
        return WorkerGroup(
            spec,
            rundir,
            placement,
            attempt,
            base_ref,
            nodes.agent_for,
            nodes.reservation,
            nodes.index_of,
            spares,
        )

    return Parts(
        CheckpointStore(rundir),
        nodes,
        new_group,
        AnomalyMonitor(spec, rundir, exporter, trackers),
        control,
        chaos or NoChaos(),
        spares,
        health=NodeHealth(nodes),
    )
