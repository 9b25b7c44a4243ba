"""The fleet: the job's nodes as the supervisor sees them, one collaborator with its own state.

Contract: `Fleet(spec, parts, journal, cordoned, groups)` owns the node inventory (`parts.nodes`:
reservation, agents), the spare pool, the node health watch, the cordons (`cordoned`: node ->
reason, rebuilt from the journal by the caller) and the lease keeper that renews every actor of the
job (agents, spares, and the ranks of the groups `groups()` returns). `excluded()` is every node
never to be placed on again (cordoned or lost); `placement(world, timeout)` reserves without them
(warm spares on live nodes stand in for a lost node's ranks at once); `lose(node)` writes a node
off for the rest of the run (cordon, agent, spares; journalled as `nodes_lost` with the new
checkpoint writers' generation, whose fence `layout.FENCE` it then writes: a zombie of the node
commits and deletes nothing); `check()` and
`explain()` are `NodeHealth`'s (None/unchanged without one). Every cordon is journalled once.
`preflight(bad)` checks every node at the start; a node that joins later is checked (beside one
that passed) before the first placement that could put a rank on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from resilient.agents.lease import LeaseKeeper
from resilient.agents.preflight import run_preflight
from resilient.config import JobSpec
from resilient.rundir.layout import FENCE
from resilient.runlog.journal import Journal
from resilient.supervisor.faults import Fault
from resilient.supervisor.parts import Parts

log = logging.getLogger(__name__)


class Fleet:
    def __init__(
        self,
        spec: JobSpec,
        parts: Parts,
        journal: Journal,
        cordoned: dict[str, str],
        groups: Callable[[], tuple],
        writers: int = 0,
    ):
        """`writers`: the checkpoint writers' generation the journal records (a resumed run)."""
        self.spec, self.journal, self.groups = spec, journal, groups
        self.nodes, self.spares, self.health = parts.nodes, parts.spares, parts.health
        self.rundir = parts.store.rundir
        self.nodes.writers = writers
        self.cordoned = dict(cordoned)
        self.leases = LeaseKeeper(self._leased, min(1.0, spec.supervisor.fence_s / 4))
        self.checked: set[str] = set()  # nodes that passed or failed a preflight
        self._spares_at: list[str] | None = None  # the spares' nodes, as last journalled

    def start(self) -> list[dict]:
        """Leases renewed from now on, the agents up; the job's node list for the journal."""
        self.leases.start()
        return self.nodes.start()

    def preflight(self, bad: set[str]) -> list[dict]:
        """Every schedulable node not cordoned or lost checked at once (`agents.preflight`; `bad`:
        chaos made them compute wrong), each journalled (`preflight`); a node that fails is
        cordoned before any rank trains there. The records."""
        return self._check(self.nodes.every_node(), bad)

    def _check_joined(self) -> None:
        """Nodes not checked yet, with one that passed as their reference (an all-reduce needs a
        peer, a compute time a median). A check that cannot run is tried again next time."""
        every = [n for n in self.nodes.every_node() if n[1] not in self.excluded()]
        joined = [n for n in every if n[1] not in self.checked]
        if not joined:
            return
        try:
            self._check([n for n in every if n[1] in self.checked][:1] + joined, set())
        except Exception as e:  # Ray could not place a probe: no verdict on the node yet
            log.warning("preflight of joined nodes failed to run: %s", e)

    def _check(self, nodes: list, bad: set[str]) -> list[dict]:
        nodes = [n for n in nodes if n[1] not in self.excluded()]
        if not nodes:
            return []
        results = run_preflight(nodes, self.rundir.uri, self.rundir.storage_options, bad)
        self.checked |= {n[1] for n in nodes}
        for r in results:
            self.journal.append("preflight", **r)
        for r in results:
            if not r["ok"]:
                self.cordon(r["node"], "preflight: " + "; ".join(r["reasons"]))
        return results

    def _leased(self) -> list:
        """What the LeaseKeeper renews: every agent not renewed by a heartbeat gather within the
        last round (agents.relays), the ranks not relayed, the spares."""
        groups, renewed = list(self.groups()), set()
        for g in groups:
            if hasattr(g, "relays"):
                renewed |= g.relays.renewing(self.leases.every_s)
        out = [a for nid, a in list(self.nodes.agents.items()) if nid not in renewed]
        for g in groups:
            if hasattr(g, "leased"):
                out += g.leased()
            else:
                out += [w for w in getattr(g, "workers", None) or [] if w is not None]
        if self.spares:
            out += [e[0] for e in self.spares.spares]
        return out

    def excluded(self) -> set[str]:
        return set(self.cordoned) | self.nodes.lost()

    def cordon(self, node: str, reason: str) -> None:
        if node not in self.cordoned:
            self.cordoned[node] = reason
            self.journal.append("cordon", node=node, reason=reason)

    def placement(self, world: int, timeout: float | None = None) -> list[str] | None:
        """The node of each rank's slot (None: Ray did not place them within `timeout`, default
        `supervisor.start_timeout`)."""
        stand_ins = self.spares.available() if self.spares else 0
        if self.checked:  # nodes that joined since: checked before a rank may land there
            self._check_joined()
        return self.nodes.placement(self.excluded(), world, timeout, stand_ins)

    def warm(self, world: int) -> None:
        """The first group's ranks and the spares, all started as spares and warmed before the
        first step: on a machine with no idle core, a spare that warms beside training slows it
        (measured: 2x slower steps for the first 10 s, docs/benchmarks.md)."""
        if not self.spares or not self.placement(world):
            return
        t0 = time.time()
        self.spares.fill(extra=world)
        warm = self.spares.wait_warm(self.spec.supervisor.start_timeout)
        self.journal.append("workers_warm", workers=warm, seconds=round(time.time() - t0, 3))

    def refill(self) -> None:
        """Replacements for the next restart, in the slots left free; a `spares` record (the node
        of each) whenever where they are changed (the dashboard's cluster panel)."""
        if self.spares:
            self.spares.fill()
            where = sorted(n for n in self.spares.nodes() if n)
            if where != self._spares_at:
                self._spares_at = where
                self.journal.append("spares", nodes=where)

    def lose(self, node: str) -> None:
        """A lost or cut-off node: never placed on again, its agent and spares written off, and a
        new writers' generation fenced in storage (a zombie of the node commits nothing)."""
        self.nodes.drop(node)
        if self.spares:
            self.spares.forget({node})
        generation = self.nodes.new_writers()
        self.journal.append("nodes_lost", nodes=[node], generation=generation)
        threading.Thread(target=self._fence, args=(generation,), daemon=True).start()

    def _fence(self, generation: int, tries: int = 8) -> None:
        """Write the fence (`layout.FENCE`), retrying through an outage; a newer one wins."""
        for i in range(tries):
            if self.nodes.writers != generation:
                return
            try:
                self.rundir.write_json(FENCE, {"generation": generation, "t": time.time()})
                return
            except Exception:  # storage away: the agents' leases fence the node meanwhile
                time.sleep(min(30.0, 0.5 * 2**i))

    def explain(self, fault: Fault, group) -> Fault:
        """A rank's death, or the loss of its whole node (one fault for all its ranks)."""
        return self.health.explain(fault, group) if self.health else fault

    def check(self, group, now: float, step: int) -> Fault | None:
        return self.health.check(group, now, step) if self.health else None

    def close(self) -> None:
        self.nodes.shutdown()
        if self.spares:
            self.spares.shutdown()
        self.leases.close()
