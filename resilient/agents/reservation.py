"""The job's reservation on the cluster: Ray placement groups holding a slot for every worker.

Contract: `Reservation(spec).reserve(excluded, timeout, world)` holds two placement groups, each
bundle `cluster.resources_per_worker`: one bundle per rank (`world` of them, default
`cluster.num_workers`; `cluster.placement_strategy`), which must be
placed within `timeout` or `reserve` returns False; and one per spare (`spares_wanted(spec)`),
placed when the cluster has room (best effort: a spare never keeps a rank from its slot), after the
ranks' and on other nodes than theirs where those have room (`_add_spares`). No bundle
lands on a node in `excluded` (cordoned or lost nodes; a label selector on Ray's `ray.io/node-id`
node label). A new cordon or world size makes new groups (and a new `generation`): Ray ends every
worker left in the old ones. A node that died (`lost`) does not: Ray moves its bundles to live
nodes itself (`reserve` waits up to RESCHEDULE_WAIT_S for that, 5 s with spares, whose bundles
may hold the room; else it makes new groups), so the workers in the other bundles, the survivors,
live on in the same generation.

A slot is one bundle; a worker runs in one slot and reserves exactly a rank's resources there, a
spare too (so spares never oversubscribe a shared cluster, and a GPU spare holds its GPU).
`acquire(prefer, spare)` takes a free slot of a placed group on a node not `lose()`n (`prefer`
first; a spare's group's slots first for a spare, the ranks' for a rank), `release_slot(slot)`
frees it; `node_of(slot)` is
where Ray placed it, `strategy(slot)` the scheduling strategy that puts a worker there.
`placement()` is the node of each rank slot. `ranks_of(group)` says where each rank of a started
group runs (the journal's `ranks` record).
"""

from __future__ import annotations

import threading
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


def assign(
    num_workers: int,
    bundle: dict[str, float],
    order: list[str],
    resources: dict[str, dict],
    excluded: set[str],
) -> list[str] | None:
    """Which node each rank goes to: pack ranks onto the nodes in `order`, skipping `excluded`
    (cordoned or lost) ones; None when the healthy nodes cannot hold `num_workers` bundles. Pure."""
    out = []
    for nid in order:
        if nid in excluded:
            continue
        res = resources[nid]
        fits = min(
            (int(res.get(k, 0) // v) for k, v in bundle.items() if v > 0), default=num_workers
        )
        out += [nid] * min(fits, num_workers - len(out))
        if len(out) == num_workers:
            return out
    return None


def capacity(
    bundle: dict[str, float], order: list[str], resources: dict[str, dict], excluded: set[str]
) -> int:
    """How many bundles the nodes in `order` hold, `excluded` ones aside. Pure."""
    total = 0
    for nid in order:
        if nid in excluded:
            continue
        res = resources[nid]
        total += min((int(res.get(k, 0) // v) for k, v in bundle.items() if v > 0), default=0)
    return total


def spares_wanted(spec: JobSpec) -> int:
    """How many spares the job asks for: `cluster.spares`, or by default ("auto") one per rank,
    except GPU jobs on an embedded cluster (a GPU spare holds a GPU of this machine). On a joined
    cluster "auto" is an upper bound: the reservation places only what the nodes without ranks
    hold (`Reservation`)."""
    c = spec.cluster
    if not spec.supervisor.warm_spares:
        return 0
    if is_auto(spec):
        return c.num_workers if c.address or not c.resources_per_worker.get("GPU") else 0
    return c.spares


def is_auto(spec: JobSpec) -> bool:
    return spec.cluster.spares in (None, "auto")


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
        self.lost: set[str] = set()  # nodes lost in this run: no slot there is handed out

    def reserve(
        self,
        excluded: set[str],
        timeout: float,
        world: int | None = None,
        lost: set[str] = frozenset(),
        stand_ins: int = 0,
    ) -> bool:
        """Rank slots placed, on no excluded node; False when the cluster cannot hold them.
        Nodes that died (`lost`, a subset of `excluded`) need no new groups: Ray moves their
        bundles to live nodes itself, and the workers in the other bundles (survivors) live on.
        When `stand_ins` (warm spares on live nodes) cover the rank slots on lost nodes, nothing
        waits for Ray to move them: the spares take those ranks (their slots are Ray's to move)."""
        excluded, world = frozenset(excluded), world or self.spec.cluster.num_workers
        moved = self.excluded is not None and excluded - self.excluded <= frozenset(lost)
        fresh = not (moved and world == self.world and self.groups)
        if fresh:
            self.release()
            self.excluded, self.world, self.generation = excluded, world, self.generation + 1
            self.groups[False] = self._group(world, strategy_of(self.spec))
            # one ready() per group: each call schedules a probe task in it
            self._ready = {False: self.groups[False].ready()}
        elif excluded != self.excluded:  # a node died under the groups
            self.excluded = excluded
            on_lost = sum(1 for node in self.placement() if node is None or node in excluded)
            # Spares' bundles may hold the room the ranks' need (Ray does not preempt them): then
            # new groups, without the spares' first, place sooner than waiting would.
            wait = RESCHEDULE_WAIT_S if True not in self.groups else SPARES_RESCHEDULE_WAIT_S
            if stand_ins < on_lost and not self._rescheduled(min(timeout, wait)):
                return self.reserve(excluded, timeout, world)  # not in time: new groups
        if not self._placed(False, timeout):
            self.release()  # hold nothing while the job cannot run
            return False
        if fresh:
            self._add_spares()
        if True in self.groups:  # spares are best effort: a short wait, so agents start with them
            self._placed(True, min(timeout, SPARES_WAIT_S))
        self._nodes.clear()
        return True

    def _add_spares(self) -> None:
        """The spares' group, once the ranks' is placed: on nodes that hold no rank when those
        have room for every spare (a lost node then takes no spare with its ranks), else anywhere
        (still never on an excluded node). With "auto" on a joined cluster, only as many as the
        nodes without ranks hold (free capacity; none when there is none)."""
        want = spares_wanted(self.spec)
        if not want:
            return
        ranks_on = set(self.placement())
        others = [
            n
            for n in ray.nodes()
            if n["Alive"] and n["NodeID"] not in self.excluded and n["NodeID"] not in ranks_on
        ]
        bundle = self.spec.cluster.resources_per_worker
        room = capacity(
            bundle,
            [n["NodeID"] for n in others],
            {n["NodeID"]: n["Resources"] for n in others},
            set(),
        )
        if is_auto(self.spec) and self.spec.cluster.address:
            want = min(want, room)
        if not want:
            return
        avoid = frozenset(ranks_on) if room >= want else frozenset()
        strategy = strategy_of(self.spec)
        self.groups[True] = self._group(want, LOOSE.get(strategy, strategy), avoid)
        self._ready[True] = self.groups[True].ready()

    def _group(
        self, count: int, strategy: str, avoid: frozenset[str] = frozenset()
    ) -> PlacementGroup:
        bundle = {k: float(v) for k, v in self.spec.cluster.resources_per_worker.items() if v > 0}
        selector = None
        if self.excluded or avoid:
            nodes = ",".join(sorted(self.excluded | avoid))
            selector = [{NODE_LABEL: f"!in({nodes})"}] * count
        return placement_group([bundle] * count, strategy, bundle_label_selector=selector)

    def _rescheduled(self, timeout: float) -> bool:
        """Whether Ray placed every rank bundle again on live nodes within `timeout` (until Ray
        declares a node dead its bundles stay there, the group still "placed")."""
        deadline = time.monotonic() + timeout
        while True:
            table = placement_group_table(self.groups[False])
            nodes = table.get("bundles_to_node_id", {}).values()
            if table.get("state") == "CREATED" and not set(nodes) & self.excluded:
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
        if any(node in self.lost for node in self._nodes.values()):
            self._nodes.clear()  # Ray may have moved a lost node's bundles since: ask again
        free = [s for s in self.slots() if s not in self.held and self.node_of(s) not in self.lost]
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

    def lose(self, node: str) -> None:
        """`node` died or is cut off: no slot on it is handed out again (Ray may move its bundles
        to live nodes later: then they are slots again)."""
        self.lost.add(node)
        self._nodes.clear()

    def release(self, wait_s: float | None = None) -> None:
        """Remove the job's placement groups; with `wait_s`, wait at most that long (a shutdown:
        when the GCS is gone, as a signal to the whole job can end a cluster the user started
        beside the launch, Ray holds the call for a minute and then ends this process; the groups
        end with the driver's job anyway)."""
        groups = list(self.groups.values())
        if wait_s is None:
            _remove(groups)
        else:
            t = threading.Thread(target=_remove, args=(groups,), name="release", daemon=True)
            t.start()
            t.join(wait_s)
        self.groups.clear()
        self._ready.clear()
        self.held.clear()
        self._nodes.clear()


def ranks_of(group) -> list[dict]:
    """Where each rank of a started group runs: pid, node, the GPUs Ray gave it and whether its
    node agent relays its heartbeats ([] for a group without workers' infos, such as a scripted
    one)."""
    relays = getattr(group, "relays", ())
    return [
        {
            "rank": i,
            "pid": x.get("pid"),
            "node": x.get("node_id"),
            "gpus": x.get("gpus", []),
            "relayed": i in relays,
        }
        for i, x in enumerate(getattr(group, "infos", None) or [])
    ]


def _remove(groups: list) -> None:
    for g in groups:
        if not ray.is_initialized():  # shut down meanwhile: a Ray call would start a new Ray
            return
        try:
            remove_placement_group(g)
        except Exception:  # Ray is shutting down
            pass
