"""Fakes for driving the Supervisor without Ray: a node inventory (`supervisor.scripted_nodes`)
and a control poller that serve a `Scenario` (resilient.agents.scripted), and a harness that runs
a whole job on them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resilient.agents.scripted import FakeClock, Scenario, ScriptedGroup
from resilient.anomaly.monitor import AnomalyMonitor
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import validate_tree
from resilient.rundir import RunDir
from resilient.runlog.journal import Journal, read_records
from resilient.supervisor.parts import Parts
from resilient.supervisor.scripted_nodes import ScriptedNodes
from resilient.supervisor.supervisor import Supervisor
from resilient.training.corpus import write_corpus

FakeNodes = ScriptedNodes  # n nodes of one CPU each, serving the scenario


@dataclass
class FakeControl:
    """A stop request that arrives when `stop_when()` first says so."""

    stop_when: object = None
    seen: bool = False
    stop_deadline: float | None = None
    scale_to: int | None = None

    by_signal: bool = False  # the stop is a SIGTERM's, not a `resilient stop`
    at_once: object = None  # the supervisor's `nothing_to_save`

    @property
    def stop_reason(self) -> str | None:
        self.seen = self.seen or bool(self.stop_when and self.stop_when())
        if not self.seen:
            return None
        return "SIGTERM (preemption)" if self.by_signal else "resilient stop"

    @property
    def signalled(self) -> bool:
        return (
            self.by_signal and self.stop_reason is not None
        )  # (asked on its own, as the real one)

    def end_at_once_while(self, nothing_to_save, record_end) -> None:
        self.at_once = nothing_to_save

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
    stop_by_signal: bool = False
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
        self.control = FakeControl(self.stop_when, by_signal=self.stop_by_signal)
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
