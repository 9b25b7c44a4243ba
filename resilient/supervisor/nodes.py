"""The node inventory: the job's reservation, one NodeAgent per node the job uses, their peers,
their events, and where the freshest checkpoint copy lives.

Contract: `Nodes(spec, run_uri).start()` reserves the job's slots (`agents.reservation`: Ray
placement groups) and places a NodeAgent on every node a slot is on, and only there (pinned with a
hard node-affinity); `placement(excluded)` reserves again without the excluded (cordoned, lost)
nodes when they changed, adds agents on nodes the job newly uses, and returns the node of each
rank's slot, or None at once when the healthy nodes cannot hold `num_workers` bundles (`assign`,
pure) or when Ray does not place them within `supervisor.start_timeout`. Agents are peered in a ring
(each replicates to the next); agents whose node died are dropped. `restore_source()` returns the
freshest verified copy over every tier, preferring, for the same step, this node's memory, then a
peer's replica, then storage, with the reason each newer copy was skipped. `poll_events()` collects
the agents' events without blocking.
"""

from __future__ import annotations

__all__ = ["Nodes", "assign", "capacity", "schedulable_nodes"]

import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from resilient.agents.node_agent import NodeAgent
from resilient.agents.reservation import Reservation, assign, capacity
from resilient.checkpoint.source import TIER_ORDER, Lookup, RestoreSource
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore
from resilient.config import JobSpec
from resilient.supervisor.health import PROBE_TIMEOUT_S, REFUSED, probe

AGENT_CALL_S = 3.0  # deadline of a call to a node agent (an unreachable node must not stall us)
VERIFY_BYTES_PER_S = 200e6  # a verification's deadline grows with the checkpoint it hashes


def schedulable_nodes() -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


class PreflightFailed(Exception):
    """A node of the job cannot do its part (read and write the run directory): the reason, with
    the node and the fix."""


STORAGE_CHECK_S = 120.0  # an agent's storage check (an unreachable endpoint takes retries)


class Nodes:
    def __init__(self, spec: JobSpec, run_uri: str):
        self.spec, self.run_uri = spec, run_uri
        self.agents: dict[str, object] = {}
        self.order: list[str] = []
        self._lost: set[str] = set()
        self.resources: dict[str, dict] = {}
        self._event_refs: dict[str, ray.ObjectRef] = {}
        self._last_events = 0.0
        self._answered: dict[str, float] = {}  # when each agent last answered
        self._addresses: dict[str, tuple[str, int]] = {}  # each node's raylet
        self.writers = 0  # the checkpoint writers' generation (storage.generation_fence)
        self.reservation = Reservation(spec) if spec is not None else None

    def start(self) -> list[dict]:
        """Reserve and start the agents, each checked to read and write the run directory from
        its node (raises PreflightFailed naming the node); the job's node list (index, node id,
        ip, resources) for the journal."""
        self.placement(set())
        by_id = {n["NodeID"]: n for n in ray.nodes()}
        self._check_storage(by_id)
        return [
            {
                "index": i,
                "node_id": nid,
                "ip": by_id.get(nid, {}).get("NodeManagerAddress"),
                "resources": by_id.get(nid, {}).get("Resources"),
            }
            for i, nid in enumerate(self.order)
        ]

    def _check_storage(self, by_id: dict[str, dict]) -> None:
        refs = {nid: a.check_storage.remote() for nid, a in self.agents.items()}
        for nid, ref in refs.items():
            try:
                why = ray.get(ref, timeout=STORAGE_CHECK_S)
            except Exception as e:  # the agent died or did not answer
                why = f"its node agent did not answer ({type(e).__name__})"
            if why:
                ip = by_id.get(nid, {}).get("NodeManagerAddress", "?")
                raise PreflightFailed(
                    f"node {nid[:12]} ({ip}) {why}: every node reads the staged inputs from and "
                    "writes checkpoints to checkpoint.storage; give each node its credentials "
                    "and endpoint (its environment, or checkpoint.storage_options), then "
                    "`resilient launch --resume RUN_DIR`"
                )

    def capacity(self, excluded: set[str]) -> int:
        """How many ranks' bundles the live nodes hold, `excluded` ones aside."""
        nodes = schedulable_nodes()
        resources = {n["NodeID"]: n["Resources"] for n in nodes}
        bundle = self.spec.cluster.resources_per_worker
        return capacity(bundle, [n["NodeID"] for n in nodes], resources, excluded)

    @property
    def generation(self) -> int:
        """Changes whenever the reservation is made anew (Ray then ends the workers in it)."""
        return self.reservation.generation

    def placement(
        self,
        excluded: set[str],
        world: int | None = None,
        timeout: float | None = None,
        stand_ins: int = 0,
    ) -> list[str] | None:
        """The node of each of `world` (default `num_workers`) ranks' slots; None when they cannot
        be placed (within `timeout`, default `supervisor.start_timeout`). `stand_ins`: warm spares
        on live nodes (see `Reservation.reserve`)."""
        c = self.spec.cluster
        world = world or c.num_workers
        nodes = schedulable_nodes()
        self._learn(nodes)
        self.resources = {n["NodeID"]: n["Resources"] for n in nodes}
        order = [n["NodeID"] for n in nodes]
        if assign(world, c.resources_per_worker, order, self.resources, excluded) is None:
            return None  # cannot fit whatever Ray does: say so now, not after a timeout
        timeout = timeout or self.spec.supervisor.start_timeout
        if not self.reservation.reserve(excluded, timeout, world, self._lost, stand_ins):
            return None
        self._ensure_agents(self.reservation.nodes())
        return self.reservation.placement()

    def number_as_launch(self, timeout: float) -> bool:
        """Reserve the job's slots as a launch does, without starting agents, so `order` numbers
        the nodes as a launch would (chaos `node = i`, a rank's node); False where they do not
        fit within `timeout` (then `every_node` numbers them in Ray's order)."""
        if not self.reservation.reserve(set(), timeout):
            return False
        self.order += [nid for nid in self.reservation.nodes() if nid not in self.order]
        return True

    def every_node(self) -> list[tuple[int, str, str | None]]:
        """(index, node id, ip) of every schedulable node, lost ones aside; nodes not yet in
        `order` join it (so chaos `node = i` and preflight name the same node)."""
        for n in schedulable_nodes():
            if n["NodeID"] not in self.order:
                self.order.append(n["NodeID"])
            self._learn([n])
        return [
            (i, nid, self._addresses.get(nid, (None, 0))[0])
            for i, nid in enumerate(self.order)
            if nid not in self._lost
        ]

    def _learn(self, nodes: list[dict]) -> None:
        for n in nodes:
            self._addresses[n["NodeID"]] = (n["NodeManagerAddress"], n["NodeManagerPort"])

    def address_of(self, node_id: str) -> tuple[str, int] | None:
        """The (ip, port) of the node's raylet (None: Ray never listed it)."""
        if node_id not in self._addresses:
            self._learn(ray.nodes())
        return self._addresses.get(node_id)

    def answered_at(self, node_id: str) -> float | None:
        """When the node's agent last answered (None: it has no agent, or it was dropped)."""
        return self._answered.get(node_id) if node_id in self.agents else None

    def _ensure_agents(self, node_ids: list[str]) -> None:
        """An agent on each of these nodes; a node's index (chaos `node = i`) is its place in
        `order`, which only grows."""
        ckpt, anomaly = self.spec.checkpoint.model_dump(), self.spec.anomaly.model_dump()
        new = [nid for nid in node_ids if nid not in self.agents and nid not in self._lost]
        for nid in new:
            strategy = NodeAffinitySchedulingStrategy(node_id=nid, soft=False)
            self.agents[nid] = NodeAgent.options(
                scheduling_strategy=strategy, max_restarts=0
            ).remote(nid, self.run_uri, ckpt, anomaly, self.spec.supervisor.fence_s, self.writers)
            if nid not in self.order:
                self.order.append(nid)
        if new:
            ray.get([self.agents[nid].info.remote() for nid in new], timeout=120)
            now = time.time()
            self._answered.update({nid: now for nid in new})
            self._ring()

    def _ring(self) -> None:
        ids = sorted(self.agents)
        for i, nid in enumerate(ids):
            peer = self.agents[ids[(i + 1) % len(ids)]] if len(ids) > 1 else None
            self.agents[nid].set_peer.remote(peer)

    def lost(self) -> set[str]:
        """Nodes that died during the run."""
        return set(self._lost)

    def drop(self, node_id: str) -> None:
        """`node_id` is lost for the rest of the run: never placed on again, its agent ended (if
        Ray can still reach it) and out of the peer ring."""
        self._lost.add(node_id)
        if self.reservation is not None:
            self.reservation.lose(node_id)
        agent = self.agents.pop(node_id, None)
        if agent is not None:
            self._event_refs.pop(node_id, None)
            try:
                ray.kill(agent, no_restart=True)
            except Exception:  # already gone
                pass
            self._ring()

    def new_writers(self) -> int:
        """A node was written off: every live agent commits under a new generation from now on
        (each told within AGENT_CALL_S), so the fence the caller writes refuses only the old
        node's. Returns the new generation."""
        self.writers += 1
        refs = [a.set_generation.remote(self.writers) for a in self.agents.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=AGENT_CALL_S)
        return self.writers

    def agent_for(self, node_id: str):
        """The node's agent; started now where a worker landed on a node without one."""
        if node_id not in self.agents and node_id not in self._lost and self.spec is not None:
            self._ensure_agents([node_id])
        return self.agents.get(node_id)

    def prune_dead(self) -> list[str]:
        """Drop the agents of nodes that are dead: Ray's GCS says so, or their raylet refuses
        connections (the node's processes are gone; Ray's health checks say so only later).
        A raylet that does not answer at all is left to `NodeHealth` (a partition is seen as
        silence first)."""
        by_id = {n["NodeID"]: n for n in ray.nodes()}
        self._learn(list(by_id.values()))
        gone = [
            nid
            for nid in list(self.agents)
            if not by_id.get(nid, {}).get("Alive")
            or probe(self.address_of(nid), PROBE_TIMEOUT_S) == REFUSED
        ]
        for nid in gone:
            self.drop(nid)
        return gone

    def poll_events(self, every_s: float = 1.0) -> tuple[list[dict], list[tuple[str, dict]]]:
        """Checkpoint events and metric samples (node, sample) the agents reported since the last
        call (non-blocking; asks at most every `every_s`)."""
        out, samples = [], []
        for nid, ref in list(self._event_refs.items()):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                del self._event_refs[nid]
                try:
                    got = ray.get(ref)
                except ray.exceptions.RayActorError:
                    self.drop(nid)
                    continue
                self._answered[nid] = time.time()
                out += [{**e, "node": nid} for e in got["events"]]
                samples += [(nid, smp) for smp in got["samples"]]
        if time.time() - self._last_events >= every_s:
            self._last_events = time.time()
            for nid, a in self.agents.items():
                self._event_refs.setdefault(nid, a.events.remote())
        return out, samples

    def flush_events(self, timeout: float = 10.0) -> list[dict]:
        """Every agent's events not journalled yet: those of a poll still in flight (the agent
        handed them over already: dropping its answer would lose them, a step's `persisted`
        record at the job's end among them), then the rest."""
        out = []
        pending, self._event_refs = self._event_refs, {}
        for nid, a in list(self.agents.items()):
            for ref in (pending.get(nid), a.events.remote()):
                if ref is None:
                    continue
                try:
                    got = ray.get(ref, timeout=min(timeout, AGENT_CALL_S))
                except Exception:
                    continue
                out += [{**e, "node": nid} for e in got["events"]]
        return out

    def index_of(self, node_id: str) -> int:
        return self.order.index(node_id) if node_id in self.order else -1

    def node_at(self, index: int) -> str | None:
        return self.order[index] if 0 <= index < len(self.order) else None

    def _in_memory(self, fingerprint: str) -> list[tuple[int, str, str | None, object, int]]:
        """(step, tier, node, agent, bytes) of every snapshot the agents hold for this spec; asked
        of every agent at once, each given AGENT_CALL_S (an agent that does not answer is
        skipped: a node cut off must not stall the lookup)."""
        refs = {nid: a.inventory.remote() for nid, a in list(self.agents.items())}
        if not refs:
            return []
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=AGENT_CALL_S)
        cands = []
        for nid, ref in refs.items():
            if ref not in ready:
                continue
            try:
                inv = ray.get(ref)
            except Exception:  # the node is gone
                self.drop(nid)
                continue
            agent = self.agents[nid]
            cands += [
                (e["step"], e["role"], nid, agent, e["bytes"])
                for e in inv
                if e["fingerprint"] == fingerprint
            ]
        return cands

    def restore_source(
        self,
        store: CheckpointStore,
        fingerprint: str,
        at_most: int | None = None,
        exclude: frozenset[int] = frozenset(),
    ) -> Lookup:
        """The freshest verified copy (of a step <= `at_most`; none of the persisted steps in
        `exclude`: a rollback abandoned them)."""
        cands, skipped, storage_error = self._in_memory(fingerprint), [], None
        damaged: set[int] = set()
        try:
            cands += [(s, "storage", None, None, 0) for s in store.steps()]
        except Exception as e:  # an outage, not "no checkpoint": memory copies still count
            storage_error = f"cannot list ({type(e).__name__}: {e})"[:300]
            skipped.append(f"storage: {storage_error}")
        if at_most is not None:  # a rollback: only states from before the anomaly
            cands = [c for c in cands if c[0] <= at_most]
        cands = [c for c in cands if c[0] not in exclude]  # memory copies too
        cands.sort(key=lambda c: (-c[0], TIER_ORDER[c[1]]))
        for step, tier, nid, agent, nbytes in cands:
            try:
                if agent is not None:  # a deadline of AGENT_CALL_S plus its hashing time
                    deadline = AGENT_CALL_S + nbytes / VERIFY_BYTES_PER_S
                    reason = ray.get(agent.verify.remote(step, fingerprint), timeout=deadline)
                    if reason:
                        raise CheckpointInvalid(reason)
                else:
                    store.verify(step, fingerprint)
            except CheckpointInvalid as e:
                skipped.append(f"{tier}: {e}")
                if agent is None:
                    damaged.add(step)
                continue
            except Exception as e:  # the agent died under us, or storage is down
                skipped.append(f"{tier} on {str(nid)[:8]}: {type(e).__name__}")
                if agent is None:
                    storage_error = f"cannot read step {step} ({type(e).__name__}: {e})"[:300]
                continue
            source = RestoreSource(step, tier, nid, agent)
            return Lookup(source, skipped, storage_error, frozenset(damaged))
        return Lookup(None, skipped, storage_error, frozenset(damaged))

    def forget_after(self, step: int) -> None:
        """Every agent drops its snapshots newer than `step` (a rollback: they belong to the
        timeline it abandoned; an sdc's may hold the corruption), those still waiting for storage
        too; each asked within AGENT_CALL_S."""
        refs = [a.forget_after.remote(step) for a in self.agents.values()]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=AGENT_CALL_S)

    def protect(self, steps: set[int]) -> None:
        """No agent's retention deletes these steps (the one a group is restoring)."""
        for a in self.agents.values():
            a.protect.remote(steps)

    def shutdown(self) -> None:
        for a in self.agents.values():
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self.agents.clear()
        if self.reservation is not None:
            self.reservation.release(wait_s=AGENT_CALL_S)
