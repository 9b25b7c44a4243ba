"""Fakes for driving the Supervisor without Ray: a node inventory and a control poller that serve
a `Scenario` (resilient.agents.scripted), and a harness that runs a whole job on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resilient.agents.scripted import FakeClock, Scenario, ScriptedGroup
from resilient.anomaly.monitor import AnomalyMonitor
from resilient.checkpoint.source import Lookup, RestoreSource
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import validate_tree
from resilient.rundir import RunDir
from resilient.runlog.journal import Journal, read_records
from resilient.supervisor.nodes import assign, capacity
from resilient.supervisor.parts import Parts
from resilient.supervisor.supervisor import Supervisor
from resilient.training.corpus import write_corpus


class FakeNodes:
    """`n` nodes of one CPU each; memory snapshots and GPU samples come from the scenario."""

    def __init__(self, scenario: Scenario, n: int = 3):
        self.sc = scenario
        self.order = [f"node{i}" for i in range(n)]
        self.resources = {nid: {"CPU": 1.0} for nid in self.order}
        self.agents: dict = {}
        self.storage_down = 0  # this many lookups find storage unreadable
        self.storage_lost = False  # storage answers but holds nothing
        self.damaged = False  # every copy was read and fails verification
        self.reported: set[int] = set()  # snapshots reported persisted
        self.num_workers = 2  # the job's (set by Job.run)
        self.gone: set[str] = set()  # nodes lost (a test takes them away and gives them back)
        self.unplaceable: set[int] = set()  # world sizes whose placement fails

    def start(self) -> list[dict]:
        return [{"index": i, "node_id": nid} for i, nid in enumerate(self.order)]

    def every_node(self) -> list:
        return []  # no preflight without Ray

    def forget_after(self, step: int) -> None:
        self.snapshots_after = step  # an sdc rollback's

    def placement(
        self, excluded: set[str], world=None, timeout=None, stand_ins=0
    ) -> list[str] | None:
        n = world or self.num_workers
        if n in self.unplaceable:  # capacity says yes, Ray says no (other jobs hold it)
            return None
        return assign(n, {"CPU": 1.0}, self.order, self.resources, excluded)

    def capacity(self, excluded: set[str]) -> int:
        return capacity({"CPU": 1.0}, self.order, self.resources, excluded | self.lost())

    def lost(self) -> set[str]:
        return set(self.gone)

    def prune_dead(self) -> list[str]:
        return []

    def drop(self, node: str) -> None:
        self.gone.add(node)

    def new_writers(self) -> int:
        self.writers = getattr(self, "writers", 0) + 1
        return self.writers

    def restore_source(self, store, fingerprint, at_most=None, exclude=frozenset()):
        if self.storage_down:
            self.storage_down -= 1
            return Lookup(None, ["storage: cannot list"], "ConnectionError: down")
        steps = [s for s in self.sc.snapshots if at_most is None or s <= at_most]
        if self.damaged:
            return Lookup(
                None,
                [f"storage: step {s}: checksum mismatch" for s in steps],
                None,
                frozenset(steps),
            )
        if self.storage_lost or not steps:
            return Lookup(None)
        return Lookup(RestoreSource(max(steps), "memory", self.order[0]))

    def poll_events(self):
        """Every snapshot is reported persisted (an agent's `persisted` event)."""
        new = sorted(self.sc.snapshots - self.reported)
        self.reported |= set(new)
        return [{"event": "persisted", "step": s} for s in new], self.sc.take_samples()

    def protect(self, steps: set[int]) -> None:
        self.protected = set(steps)

    def flush_events(self) -> list[dict]:
        return []

    def shutdown(self) -> None:
        pass

    def node_at(self, index: int) -> str | None:
        return self.order[index] if 0 <= index < len(self.order) else None


@dataclass
class FakeControl:
    """A stop request that arrives when `stop_when()` first says so."""

    stop_when: object = None
    seen: bool = False
    stop_deadline: float | None = None
    scale_to: int | None = None

    @property
    def stop_reason(self) -> str | None:
        self.seen = self.seen or bool(self.stop_when and self.stop_when())
        return "resilient stop" if self.seen else None

    def close(self) -> None:
        pass


@dataclass
class Job:
    """One supervised job over a scripted group: its status, journal and groups after `run()`."""

    tmp: Path
    scenario: Scenario = field(default_factory=Scenario)
    steps: int = 30
    spec: dict = field(default_factory=dict)
    stop_when: object = None
    groups: list[ScriptedGroup] = field(default_factory=list)
    nodes: FakeNodes | None = None
    control: FakeControl | None = None
    health: object = None  # a NodeHealth-like fake (check, explain)

    def run(self) -> dict:
        corpus = self.tmp / "corpus.txt"
        if not corpus.exists():
            write_corpus(str(corpus), lines=50)
        tree = {
            "name": "unit",
            "data": {"path": str(corpus)},
            "train": {"steps": self.steps},
            "cluster": {"num_workers": 2},
            "checkpoint": {"storage": str(self.tmp / "runs")},
            "supervisor": {"heartbeat_interval": 0.1, "hang_timeout": 2.0},
        }
        for section, values in self.spec.items():
            tree.setdefault(section, {}).update(values)
        spec = validate_tree(tree)
        self.scenario.heartbeat_s = spec.supervisor.heartbeat_interval
        rundir = RunDir(str(self.tmp / "runs" / "unit" / "r"))
        journal = Journal(rundir)
        rec = journal.append(
            "job", name="unit", run_id="r", total_steps=self.steps, run_dir=rundir.uri
        )
        clock = FakeClock()

        def new_group(placement: list[str], attempt: int) -> ScriptedGroup:
            self.groups.append(ScriptedGroup(self.scenario, placement, self.steps, clock, attempt))
            return self.groups[-1]

        self.nodes = self.nodes or FakeNodes(self.scenario)
        self.control = FakeControl(self.stop_when)
        self.nodes.num_workers = spec.cluster.num_workers
        parts = Parts(
            CheckpointStore(rundir),
            self.nodes,
            new_group,
            AnomalyMonitor(spec, rundir),
            self.control,
            clock=clock,
            health=self.health,
        )
        self.status = Supervisor(spec, rundir, journal, parts, [rec]).run()
        self.records = read_records(rundir)
        return self.status

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["type"] == kind]
