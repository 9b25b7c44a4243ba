"""WorkerGroup: the ranks of one attempt, placed, rendezvoused, started, polled and torn down.

Contract: `start()` puts one TrainWorker per rank in a slot of the job's reservation (a warm spare,
in its own slot, where the pool has one; else a new worker, in the rank's own slot if it is free)
and starts training, raising `GroupStartError` with the cause if that fails; `placement[rank]` is
then the node each rank runs on.
`poll(wait_s)` keeps one heartbeat in flight per rank, waits up to `wait_s` and returns the
heartbeats that arrived; `latest[rank]` is each rank's newest, `dead[rank]` the death of each rank
whose actor died (a rank on this machine whose process is gone is dead at the next poll), and
`last_answer[rank]` when a rank last answered. `shutdown()` kills every rank (SIGKILL also ends a
SIGSTOPped process) and frees their slots.
Survivors: `replace(ranks)` kills those ranks and frees their slots; `leave(timeout)` has the
others leave the broken process group and returns the ranks that could not (blocked past
`timeout`); a later `start()` fills the empty ranks (spares or new workers) and starts everyone on a
new rendezvous, the survivors with the models they kept. The world size is `len(placement)`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from resilient.agents.heartbeat import Heartbeat, add_answer
from resilient.agents.relay import local_ips, process_gone
from resilient.agents.relays import NodeRelays, relayed
from resilient.agents.reservation import Reservation
from resilient.agents.spares import SparePool, new_worker
from resilient.catalogue import PlannedFault
from resilient.checkpoint.source import RestoreSource
from resilient.config import JobSpec
from resilient.rundir import RunDir


class GroupStartError(Exception):
    def __init__(self, message: str, rank: int | None = None, dead: bool = False):
        super().__init__(message)
        self.rank, self.dead = rank, dead


@dataclass(frozen=True)
class Handoff:
    """A survivor handed its newest snapshot (of `step`) to its node agent in `seconds`."""

    rank: int
    step: int | None
    seconds: float
    bytes: int | None = None


class WorkerGroup:
    def __init__(
        self,
        spec: JobSpec,
        rundir: RunDir,
        placement: list[str],
        attempt: int,
        base_ref: str,
        agent_for: Callable[[str], object],
        reservation: Reservation,
        node_index: Callable[[str], int] = lambda node_id: -1,
        spares: SparePool | None = None,
    ):
        """`placement[rank]`: the node of the rank's own slot (where it runs, unless a spare
        elsewhere stands in: `start` says); `agent_for(node_id)` gives a node's NodeAgent,
        `node_index` its place in the job's node list (chaos `node = i`)."""
        self.spec, self.rundir, self.placement, self.attempt = spec, rundir, placement, attempt
        self.reservation, self.slots = reservation, []
        self.base_ref, self.agent_for, self.node_index = base_ref, agent_for, node_index
        self.spares = spares
        self.workers: list = []
        self.infos: list[dict] = []
        self.pending: dict[int, ray.ObjectRef] = {}
        self.issued_at: dict[int, float] = {}
        self.last_answer: dict[int, float] = {}
        self.latest: dict[int, Heartbeat] = {}
        self.dead: dict[int, str] = {}
        self.relays = NodeRelays()  # the ranks polled through their node agents
        # ranks at these addresses run on this machine (pid watch, SIGKILL)
        self._here = local_ips()

    def start(
        self, restore: RestoreSource | None, plan: tuple[PlannedFault, ...], skip: list[int]
    ) -> None:
        """Fill the empty ranks, rendezvous and start every rank, restoring from `restore`."""
        world = len(self.placement)
        if not self.workers:
            self.workers, self.slots = [None] * world, [None] * world
        if self.spares and None in self.workers:  # none that died while idle is taken
            self.spares.prune()
        for rank in range(world):
            if self.workers[rank] is None:
                self.workers[rank], self.slots[rank] = self._fill(rank)
        self._reset()
        refs = [w.info.remote(rank, self.attempt) for rank, w in enumerate(self.workers)]
        try:
            self.infos = ray.get(refs, timeout=self.spec.supervisor.start_timeout)
        except GetTimeoutError:
            raise GroupStartError(
                f"workers did not start within supervisor.start_timeout="
                f"{self.spec.supervisor.start_timeout}s"
            ) from None
        except RayActorError as e:
            rank = next((i for i, r in enumerate(refs) if _failed(r)), None)
            raise GroupStartError(
                f"a worker died while starting: {e}", rank=rank, dead=True
            ) from None
        self.placement = [info["node_id"] for info in self.infos]
        master = self.workers[0]  # its store is the rendezvous (agents.store), new each start

        def start(rank: int):
            node = self.infos[rank]["node_id"]
            agent, index = self.agent_for(node), self.node_index(node)
            w = self.workers[rank]
            return w.start.remote(master, restore, plan, self.base_ref, agent, skip, index, world)

        try:  # rank 0 first: it serves the rendezvous store before the others look for it
            ray.get(start(0))
        except RayTaskError as e:
            raise GroupStartError(f"rank 0 could not serve the rendezvous: {e}", rank=0) from None
        ray.get([start(rank) for rank in range(1, world)])
        self._relay()
        now = time.time()
        for rank in range(len(self.workers)):
            self.last_answer[rank] = now

    def _relay(self) -> None:
        """Have the node agents poll their nodes' ranks (agents.relays), where the job is that
        large; the ranks of a node without a live agent are polled directly."""
        by_node: dict[str, tuple[object, dict]] = {}
        if relayed(self.spec, len(self.workers)):
            for rank, w in enumerate(self.workers):
                node = self.infos[rank]["node_id"]
                agent = self.agent_for(node)
                if agent is not None:
                    by_node.setdefault(node, (agent, {}))[1][rank] = (w, self.infos[rank]["pid"])
        self.relays.attach(by_node)

    def _fill(self, rank: int) -> tuple[object, object]:
        """A worker for an empty rank, and its slot: a spare (the first group keeps to the
        placement, using a spare only where it shares the rank's node; a restart takes the fastest
        way back: any spare), else a new worker, in the rank's own slot if it is free."""
        node = self.reservation.node_of(self.reservation.rank_slot(rank))
        taken = self.spares.take(node if self.attempt == 0 else None) if self.spares else None
        if taken is not None:
            return taken
        slot = self.reservation.acquire(prefer=self.reservation.rank_slot(rank))
        if slot is None:
            raise GroupStartError(f"no reserved slot is free for rank {rank}")
        w = new_worker(self.spec, self.rundir.uri, self.reservation, slot, rank, self.attempt)
        return w, slot

    def _reset(self) -> None:
        """Forget what was seen of the previous life (a heartbeat still in flight is dropped)."""
        self.pending, self.issued_at, self.last_answer = {}, {}, {}
        self.latest, self.dead = {}, {}
        self.relays.forget(None)  # the agents pass nothing on to the previous life's ranks
        self.relays = NodeRelays()

    def replace(self, ranks) -> None:
        """End these ranks' processes and free their slots; `start()` fills them again."""
        self.relays.forget(ranks)
        for rank in ranks:
            w, slot = self.workers[rank], self.slots[rank]
            if w is None:
                continue
            self._kill(rank, w)
            self.reservation.release_slot(slot)
            self.workers[rank] = self.slots[rank] = None

    def write_off(self, node: str, why: str) -> None:
        """The ranks on `node` (lost or cut off) are dead now: no last heartbeat or flush is
        waited for from them."""
        self.relays.drop(node)  # its agent is asked and renews nothing more
        for r in range(len(self.infos)):
            if self.node_of(r) == node:
                self.dead.setdefault(r, why)

    def leave(self, timeout: float, drain: bool = False) -> dict[int, str]:
        """Have every remaining rank leave the broken process group (`drain`: with every snapshot
        it queued handed over, before a rollback); {rank: why} of those that could not within
        `timeout` (still blocked in a collective, or gone)."""
        refs = {
            r: w.leave.remote(timeout, drain) for r, w in enumerate(self.workers) if w is not None
        }
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout + 5)
        stuck = {}
        for rank, ref in refs.items():
            try:
                ok = ref in ready and ray.get(ref)
            except RayActorError:
                ok = False
            if not ok:
                stuck[rank] = f"rank {rank} could not leave its collective within {timeout:g}s"
        return stuck

    def _kill(self, rank: int, w) -> None:
        info = self.infos[rank] if rank < len(self.infos) else None
        if info and info["ip"] in self._here:  # see shutdown(): SIGKILL ends a stopped process
            try:
                os.kill(info["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            ray.kill(w, no_restart=True)
        except Exception:  # already gone
            pass

    def leased(self) -> list:
        """The ranks' actors whose leases the supervisor renews itself: those not relayed (a
        relaying agent renews its ranks' leases with its own)."""
        return [w for r, w in enumerate(self.workers) if w is not None and r not in self.relays]

    @property
    def size(self) -> int:
        return len(self.placement)

    def node_of(self, rank: int) -> str | None:
        return self.infos[rank]["node_id"] if rank < len(self.infos) else None

    def poll(self, wait_s: float) -> list[Heartbeat]:
        """Issue due heartbeats, wait up to `wait_s`; the heartbeats that came back (also in
        `latest`), with deaths recorded in `dead`."""
        now = time.time()
        interval = self.spec.supervisor.heartbeat_interval
        asked, released = self.relays.issue(now, interval)
        for rank in asked:
            if rank not in self.dead:
                self.pending.setdefault(rank, None)  # awaited through its node's agent
        self._direct(released)
        for rank, w in enumerate(self.workers):
            if w is None or rank in self.dead or rank in self.pending or rank in self.relays:
                continue
            if now - self.issued_at.get(rank, 0) >= interval:
                self.pending[rank] = w.heartbeat.remote()
                self.issued_at[rank] = now
        # every tick: a SIGKILLed rank is seen within one tick, not one heartbeat
        self._check_local_pids()
        by_ref = {ref: rank for rank, ref in self.pending.items() if ref is not None}
        gathers = self.relays.refs
        if not by_ref and not gathers:
            time.sleep(wait_s)
            return []
        waited = list(by_ref) + list(gathers)
        ready, _ = ray.wait(waited, num_returns=len(waited), timeout=wait_s)
        fresh = []
        for ref in ready:
            if ref in gathers:
                fresh += self._gathered(*self.relays.answer(ref, gathers[ref]))
                continue
            rank = by_ref[ref]
            del self.pending[rank]
            try:
                fresh.append(self._answered(rank, ray.get(ref)))
            except RayActorError as e:
                self.dead[rank] = str(e).splitlines()[0][:300]
        return fresh

    def _answered(self, rank: int, hb: Heartbeat) -> Heartbeat:
        if rank not in self.latest or hb.now >= self.latest[rank].now:  # a late gather's is older
            self.latest[rank] = hb
        self.last_answer[rank] = time.time()
        if rank in self.pending and self.pending[rank] is None:  # a direct call stays in flight
            del self.pending[rank]
        return hb

    def _gathered(self, node: str, beats, dead: dict, waiting: list) -> list[Heartbeat]:
        """A node agent's gather: its heartbeats taken, its deaths recorded; an agent gone leaves
        its ranks to direct heartbeats."""
        if beats is None:
            self._direct(r for r in range(len(self.infos)) if self.node_of(r) == node)
            return []
        fresh = [self._answered(rank, hb) for rank, hb in beats if rank not in self.dead]
        for rank, why in dead.items():  # after its last heartbeat: what it reported is kept
            self.dead.setdefault(rank, why)
        for rank in waiting:
            self.pending.setdefault(rank, None)
        return fresh

    def _direct(self, ranks) -> None:
        """These ranks are no longer asked through their node agent: direct heartbeats."""
        for rank in ranks:
            if rank in self.pending and self.pending[rank] is None:
                del self.pending[rank]

    def _check_local_pids(self) -> None:
        """A rank on this machine whose process is gone is dead now; Ray takes ~0.5 s to say so."""
        for rank, info in enumerate(self.infos):
            if rank in self.dead or info["ip"] not in self._here:
                continue
            if process_gone(info["pid"]):
                self.dead[rank] = f"the worker process {info['pid']} of rank {rank} is gone"

    def final_heartbeats(self, timeout: float = 1.0) -> dict[int, Heartbeat]:
        """One last heartbeat from every rank still answering (before a teardown), so what the
        survivors did since the previous heartbeat (metrics, checkpoints) is not lost."""
        refs = self._ask_directly({})  # first: they answer while the agents' gathers do
        beats, dead = self.relays.final(timeout)
        for rank, why in dead.items():
            self.dead.setdefault(rank, why)
        refs = self._ask_directly(refs)  # and the ranks of an agent dropped meanwhile
        wait = list(refs.values())
        ready = ray.wait(wait, num_returns=len(wait), timeout=timeout)[0] if wait else []
        out: dict[int, Heartbeat] = {}
        for rank, hb in beats:  # a rank may answer twice (a gather in flight, the last)
            add_answer(out, rank, hb)
        for rank, ref in refs.items():
            if ref in ready:
                try:  # a late gather (agents.relays) may have answered for it too
                    add_answer(out, rank, ray.get(ref))
                except RayActorError:
                    pass
        return out

    def _ask_directly(self, refs: dict) -> dict:
        """`refs`, and a heartbeat asked of each rank not relayed, not dead and not in it."""
        skip = {*self.dead, *refs, *self.relays.node_of}
        return refs | {
            rank: self.pending.pop(rank, None) or w.heartbeat.remote()
            for rank, w in enumerate(self.workers)
            if w is not None and rank not in skip
        }

    def flush_newest(self, answers: dict[int, Heartbeat], timeout: float = 5.0) -> Handoff | None:
        """Have the survivor holding the newest snapshot (by `answers`, the final heartbeats) hand
        it to its node agent, so the restart restores it; None if none could."""
        order = sorted(
            ((h.snapshot_step, rank) for rank, h in answers.items() if h.snapshot_step is not None),
            reverse=True,
        )
        deadline = time.time() + timeout
        for _, rank in order:
            if self.workers[rank] is None:
                continue
            t0 = time.time()
            try:
                step, size = ray.get(
                    self.workers[rank].flush.remote(), timeout=max(0.1, deadline - t0)
                )
            except Exception:  # died or stuck meanwhile: the next survivor
                continue
            return Handoff(rank, step, round(time.time() - t0, 4), size)
        return None

    def request_stop(self) -> None:
        for w in self.workers:
            if w is not None:
                w.request_stop.remote()

    def request_pause(self) -> None:
        """End training at the next step every rank agrees on (a resize)."""
        for w in self.workers:
            if w is not None:
                w.request_pause.remote()

    def inject(self, rank: int, fault: str, params: dict, fatal: bool = False) -> None:
        """Chaos: have rank `rank` do `fault` to itself (see TrainWorker.inject)."""
        self.workers[rank].inject.remote(fault, params, fatal)

    def release_chaos(self) -> None:
        """Chaos: the job-wide fault rank 0 holds the job for was carried out."""
        self.workers[0].chaos_done.remote()

    def shutdown(self, force: bool = True) -> None:
        """End every rank. `force=False` only for ranks that finished: Ray ends them, so no
        "worker died" notice reaches the console."""
        # ray.kill asks the worker to exit first, which a SIGSTOPped process never does; where the
        # rank runs on this machine, SIGKILL it directly so teardown does not wait for Ray's
        # fallback.
        self.relays.forget(None)
        for rank, w in enumerate(self.workers):
            if w is None:
                continue
            if force:
                self._kill(rank, w)
            else:
                try:
                    ray.kill(w, no_restart=True)
                except Exception:  # already gone
                    pass
        self.workers = []
        for slot in self.slots:
            if slot is not None:
                self.reservation.release_slot(slot)
        self.slots = []


def _failed(ref) -> bool:
    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True
