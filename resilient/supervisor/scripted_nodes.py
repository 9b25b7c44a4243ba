"""A node inventory without Ray, serving a `Scenario` (`agents.scripted`): the nodes of a scripted
group, for tests and benchmarks of the supervisor.

Contract: `ScriptedNodes(scenario, n, cpus, persist_every)` has the interface of
`supervisor.nodes.Nodes` that the supervisor, its fleet and `NodeHealth` use: `n` nodes of `cpus`
CPUs each (a rank takes one); memory snapshots and GPU samples come from the scenario; every
snapshot of a step `persist_every` divides is reported persisted once (a `persisted` event). Knobs
a test turns: `storage_down` (this many lookups find storage unreadable), `storage_lost` (storage
answers but holds nothing), `damaged` (every copy fails verification), `gone` (nodes lost),
`unplaceable` (world sizes Ray will not place). `probe` is a `NodeHealth` prober: a node the
scenario lost (`Scenario.lost`) refuses, any other listens.
"""

from __future__ import annotations

from resilient.agents.scripted import Scenario
from resilient.checkpoint.source import Lookup, RestoreSource
from resilient.supervisor.health import OK, REFUSED
from resilient.supervisor.nodes import assign, capacity


class ScriptedNodes:
    def __init__(self, scenario: Scenario, n: int = 3, cpus: float = 1.0, persist_every: int = 1):
        self.sc, self.persist_every = scenario, persist_every
        self._seen = 0  # snapshots of `Scenario.taken` looked at
        self.order = [f"node{i}" for i in range(n)]
        self.resources = {nid: {"CPU": cpus} for nid in self.order}
        self.agents: dict = {}
        self.storage_down = 0
        self.storage_lost = False
        self.damaged = False
        self.reported: set[int] = set()  # snapshots reported persisted
        self.num_workers = 2  # the job's (set by whoever builds the supervisor)
        self.gone: set[str] = set()
        self.unplaceable: set[int] = set()

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
        return assign(n, {"CPU": 1.0}, self.order, self.resources, excluded | self.lost())

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

    def address_of(self, node: str) -> tuple[str, int]:
        return (node, 0)

    def answered_at(self, node: str) -> float | None:
        return None  # no node agents: a node is judged by its ranks alone

    def probe(self, address: tuple[str, int] | None, timeout: float) -> str:
        return REFUSED if address and address[0] in self.sc.lost else OK

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
        """Every (`persist_every`-th) snapshot is reported persisted (an agent's event)."""
        new = sorted(s for s in self.sc.taken[self._seen :] if s % self.persist_every == 0)
        self._seen = len(self.sc.taken)
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
