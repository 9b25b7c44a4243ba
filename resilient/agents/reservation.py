"""The job's reservation on the cluster: Ray placement groups holding a slot for every worker.

Contract: `Reservation(spec).reserve(excluded, timeout, world)` holds two placement groups, each
bundle `cluster.resources_per_worker`: one bundle per rank (`world` of them, default
`cluster.num_workers`; `cluster.placement_strategy`), which must be
placed within `timeout` or `reserve` returns False; and one per spare (`spares_wanted(spec)`),
placed when the cluster has room (best effort: a spare never keeps a rank from its slot). No bundle
lands on a node in `excluded` (cordoned or lost nodes; a label selector on Ray's `ray.io/node-id`
node label). A new cordon or world size makes new groups (and a new `generation`): Ray ends every
worker left in the old ones. A node that died (`lost`) does not: Ray moves its bundles to live
nodes itself (`reserve` waits up to RESCHEDULE_WAIT_S for that, 5 s with spares, whose bundles
may hold the room; else it makes new groups), so the workers in the other bundles, the survivors,
live on in the same generation.

A slot is one bundle; a worker runs in one slot and reserves exactly a rank's resources there, a
spare too (so spares never oversubscribe a shared cluster, and a GPU spare holds its GPU).
`acquire(prefer, spare)` takes a free slot of a placed group (`prefer` first; a spare's group's
slots first for a spare, the ranks' for a rank), `release_slot(slot)` frees it; `node_of(slot)` is
where Ray placed it, `strategy(slot)` the scheduling strategy that puts a worker there.
`placement()` is the node of each rank slot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from resilient.config import JobSpec

NODE_LABEL = "ray.io/node-id"
SPARES_WAIT_S = 10.0  # how long a reservation waits for the spares' group before going on
RESCHEDULE_WAIT_S = 30.0  # how long Ray gets to move a dead node's bundles before new groups
SPARES_RESCHEDULE_WAIT_S = 5.0  # the same with a spares' group, which may hold the room
# Spares spread or pack like the ranks, but never strictly: a spare that does not fit is no error.
LOOSE = {"STRICT_PACK": "PACK", "STRICT_SPREAD": "SPREAD"}


def spares_wanted(spec: JobSpec) -> int:
    """`cluster.spares`, or by default one per rank on an embedded cluster of CPU workers (they
    cost this machine nothing while idle) and none otherwise (each would reserve a rank's
    resources: a GPU, on a joined cluster a share of other people's capacity)."""
    c = spec.cluster
    if not spec.supervisor.warm_spares:
        return 0
    if c.spares is not None:
        return c.spares
    return c.num_workers if not c.address and not c.resources_per_worker.get("GPU") else 0


def strategy_of(spec: JobSpec) -> str:
    """`cluster.placement_strategy`, or SPREAD over an embedded cluster's simulated nodes."""
    c = spec.cluster
    if c.placement_strategy:
        return c.placement_strategy
    return "SPREAD" if not c.address and c.local_nodes > 1 else "PACK"


@dataclass(frozen=True)
class Slot:
    spare: bool  # in the spares' group (else the ranks')
    index: int  # the bundle's index in its group
    generation: int  # which reservation: slots of an older one are void


class Reservation:
    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.excluded: frozenset[str] | None = None
        self.world = spec.cluster.num_workers
        self.generation = 0
        self.groups: dict[bool, PlacementGroup] = {}
        self._ready: dict[bool, ray.ObjectRef | bool] = {}  # each group's ready() (True once)
        self.held: set[Slot] = set()
        self._nodes: dict[Slot, str] = {}

    def reserve(
        self,
        excluded: set[str],
        timeout: float,
        world: int | None = None,
        lost: set[str] = frozenset(),
    ) -> bool:
        """Rank slots placed, on no excluded node; False when the cluster cannot hold them.
        Nodes that died (`lost`, a subset of `excluded`) need no new groups: Ray moves their
        bundles to live nodes itself, and the workers in the other bundles (survivors) live on."""
        excluded, world = frozenset(excluded), world or self.spec.cluster.num_workers
        moved = self.excluded is not None and excluded - self.excluded <= frozenset(lost)
        if not (moved and world == self.world and self.groups):
            self.release()
            self.excluded, self.world, self.generation = excluded, world, self.generation + 1
            n, spares = world, spares_wanted(self.spec)
            strategy = strategy_of(self.spec)
            self.groups[False] = self._group(n, strategy)
            if spares:
                self.groups[True] = self._group(spares, LOOSE.get(strategy, strategy))
            # one ready() per group: each call schedules a probe task in it
            self._ready = {k: g.ready() for k, g in self.groups.items()}
        elif excluded != self.excluded:  # a node died under the groups: wait for Ray to move them
            self.excluded = excluded
            # Spares' bundles may hold the room the ranks' need (Ray does not preempt them): then
            # new groups, without the spares' first, place sooner than waiting would.
            wait = RESCHEDULE_WAIT_S if True not in self.groups else SPARES_RESCHEDULE_WAIT_S
            if not self._rescheduled(min(timeout, wait)):
                return self.reserve(excluded, timeout, world)  # not in time: new groups
        if not self._placed(False, timeout):
            self.release()  # hold nothing while the job cannot run
            return False
        if True in self.groups:  # spares are best effort: a short wait, so agents start with them
            self._placed(True, min(timeout, SPARES_WAIT_S))
        self._nodes.clear()
        return True

    def _group(self, count: int, strategy: str) -> PlacementGroup:
        bundle = {k: float(v) for k, v in self.spec.cluster.resources_per_worker.items() if v > 0}
        selector = None
        if self.excluded:
            selector = [{NODE_LABEL: f"!in({','.join(sorted(self.excluded))})"}] * count
        return placement_group([bundle] * count, strategy, bundle_label_selector=selector)

    def _rescheduled(self, timeout: float) -> bool:
        """Whether Ray placed every rank bundle again (on live nodes) within `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            if placement_group_table(self.groups[False]).get("state") == "CREATED":
                self._nodes.clear()
                return True
            if time.monotonic() > deadline:
                self.excluded = None  # forces new groups
                return False
            time.sleep(0.1)

    def _placed(self, spare: bool, timeout: float = 0) -> bool:
        ref = self._ready.get(spare)
        if ref is None or ref is True:
            return ref is True
        if ray.wait([ref], timeout=timeout)[0]:
            self._ready[spare] = True
        return self._ready[spare] is True

    def slots(self) -> list[Slot]:
        """Every slot of the placed groups: rank slots first."""
        out = []
        for spare in (False, True):
            if self._placed(spare):
                count = len(self.groups[spare].bundle_specs)
                out += [Slot(spare, i, self.generation) for i in range(count)]
        return out

    def acquire(self, prefer: Slot | None = None, spare: bool = False) -> Slot | None:
        """A free slot: `prefer` if free, else (for a spare) the spares' group first, else the
        ranks' group first; None when every placed slot is held."""
        free = [s for s in self.slots() if s not in self.held]
        free.sort(key=lambda s: s.spare != spare)  # stable: bundle order within a group
        if prefer in free:
            free.remove(prefer)
            free.insert(0, prefer)
        if not free:
            return None
        self.held.add(free[0])
        return free[0]

    def release_slot(self, slot: Slot | None) -> None:
        self.held.discard(slot)

    def rank_slot(self, rank: int) -> Slot:
        return Slot(False, rank, self.generation)

    def node_of(self, slot: Slot) -> str | None:
        if slot.generation != self.generation or slot.spare not in self.groups:
            return None
        if slot not in self._nodes:  # one GCS call per group, not per slot
            g = self.groups[slot.spare]
            table = placement_group_table(g).get("bundles_to_node_id", {})
            for i, node in table.items():
                self._nodes[Slot(slot.spare, int(i), self.generation)] = node
        return self._nodes.get(slot)

    def placement(self) -> list[str]:
        return [self.node_of(self.rank_slot(r)) for r in range(self.world)]

    def nodes(self) -> list[str]:
        """Every node a slot of the job is on (rank slots' nodes first)."""
        out: list[str] = []
        for s in self.slots():
            node = self.node_of(s)
            if node and node not in out:
                out.append(node)
        return out

    def strategy(self, slot: Slot) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(
            self.groups[slot.spare], placement_group_bundle_index=slot.index
        )

    def forget_nodes(self) -> None:
        """Ray moved bundles (a node died): ask it again where each one is."""
        self._nodes.clear()

    def release(self) -> None:
        for g in self.groups.values():
            try:
                remove_placement_group(g)
            except Exception:  # Ray is shutting down
                pass
        self.groups.clear()
        self._ready.clear()
        self.held.clear()
        self._nodes.clear()
