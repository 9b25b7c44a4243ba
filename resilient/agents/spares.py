"""Starting TrainWorkers in the job's reserved slots, and warm spares.

Contract: `new_worker()` starts a TrainWorker in a slot of the job's `Reservation`, reserving a
rank's resources there (`cluster.resources_per_worker`, GPU included). A `SparePool` keeps
`spares_wanted(spec)` spare workers in free slots, started before they are needed (imports done,
data and model built on an idle-priority thread, on the GPU the slot holds where it holds one), so
a restart starts no process and builds no model: `fill()` tops the pool up without waiting (it
takes the slots a promoted spare left free: the pool is re-armed, not re-created; `fill(extra)` at
the start adds the first group's ranks, so every process of the job warms before training does and
none warms beside the first steps), `wait_warm()` waits for that, `take()` hands out a spare and
its slot (a warm one first); `prune()`, before a start, ends the spares that died, were fenced or
are stuck while idle, so none is handed out.
"""

from __future__ import annotations

import time

import ray
from ray.exceptions import RayActorError

from resilient.agents.reservation import Reservation, Slot, spares_wanted
from resilient.agents.worker import TrainWorker
from resilient.config import JobSpec

ALIVE_S = 1.0  # a live spare answers a renewal (on a thread of its own) within milliseconds


def split_resources(res: dict[str, float]) -> dict:
    """Ray actor options for a bundle: CPU and GPU by name, the rest as custom resources."""
    other = {k: v for k, v in res.items() if k not in ("CPU", "GPU") and v > 0}
    return {"num_cpus": res.get("CPU", 0), "num_gpus": res.get("GPU", 0), "resources": other}


def new_worker(
    spec: JobSpec, run_uri: str, reservation: Reservation, slot: Slot, rank: int, attempt: int
):
    """A TrainWorker in `slot` (rank -1: a spare)."""
    return TrainWorker.options(
        scheduling_strategy=reservation.strategy(slot),
        max_restarts=0,
        max_concurrency=4,
        **split_resources(spec.cluster.resources_per_worker),
    ).remote(spec, rank, run_uri, attempt)


class SparePool:
    """Warm spare workers (see the module contract)."""

    def __init__(self, spec: JobSpec, run_uri: str, reservation: Reservation):
        self.spec, self.run_uri, self.reservation = spec, run_uri, reservation
        self.want = spares_wanted(spec)
        self.spares: list[tuple[object, ray.ObjectRef, Slot]] = []

    def _current(self) -> None:
        """Forget spares of an older reservation: Ray ended them with its placement groups."""
        gen = self.reservation.generation
        self.spares = [e for e in self.spares if e[2].generation == gen]

    def fill(self, extra: int = 0) -> None:
        """Top the pool up to `spares_wanted` (+ `extra`: the first group's ranks, taken from it)
        without waiting."""
        self._current()
        while len(self.spares) < self.want + extra:
            slot = self.reservation.acquire(spare=True)
            if slot is None:
                return  # no free slot (yet): the next fill tries again
            w = new_worker(self.spec, self.run_uri, self.reservation, slot, -1, -1)
            self.spares.append((w, w.ping.remote(), slot))

    def wait_warm(self, timeout: float) -> int:
        """Wait up to `timeout` until every spare is warm (or dead); how many are warm."""
        refs = [ready for _, ready, _ in self.spares]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
        return len(done)

    def forget(self, nodes: set[str]) -> None:
        """Spares on these (lost) nodes are gone: end them (if Ray still can) and free their
        slots, so neither a restart nor the pool counts on them."""
        for entry in [e for e in self.spares if self.reservation.node_of(e[2]) in nodes]:
            self._end(entry)

    def _end(self, entry) -> None:
        """Out of the pool: the spare ended (if Ray still can), its slot freed."""
        self.spares.remove(entry)
        try:
            ray.kill(entry[0], no_restart=True)
        except Exception:
            pass
        self.reservation.release_slot(entry[2])

    def nodes(self) -> list[str | None]:
        """The node of each spare of the current reservation (None: not known yet)."""
        self._current()
        return [self.reservation.node_of(e[2]) for e in self.spares]

    def available(self) -> int:
        """Spares of the current reservation on nodes not lost (warm or warming)."""
        self._current()
        return sum(
            1 for e in self.spares if self.reservation.node_of(e[2]) not in self.reservation.lost
        )

    def take(self, node: str | None = None) -> tuple[object, Slot] | None:
        """A spare and its slot (on `node` only, when given; never on a lost node): a warm one if
        any; else one still warming up, which has a head start over a process started now (its
        model is half built); None if there is none."""
        self._current()
        self.forget(self.reservation.lost)
        warming = None
        for entry in list(self.spares):
            w, ready, slot = entry
            if node is not None and self.reservation.node_of(slot) != node:
                continue
            done, _ = ray.wait([ready], timeout=0)
            if not done:
                warming = warming or entry
                continue
            self.spares.remove(entry)
            try:
                ray.get(ready)
                return w, slot
            except RayActorError:  # died with its node
                self.reservation.release_slot(slot)
                continue
        if warming is not None:
            self.spares.remove(warming)
            return warming[0], warming[2]
        return None

    def prune(self) -> None:
        """Every warm spare asked at once (a renewal of its lease: one round trip in all, before
        a start takes any): those that died, were fenced or are stuck while idle, which nothing
        else asks anything, are ended and their slots freed. (One still warming says so itself:
        its `ping` fails.)"""
        self._current()
        pings = [e[1] for e in self.spares]
        done = set(ray.wait(pings, num_returns=len(pings), timeout=0)[0] if pings else ())
        warm = [e for e in self.spares if e[1] in done]
        asked = {e[0].renew.remote(time.time()): e for e in warm}
        if not asked:
            return
        answered = ray.wait(list(asked), num_returns=len(asked), timeout=ALIVE_S)[0]
        for ref, entry in asked.items():
            try:
                if ref in answered and ray.get(ref) is True:
                    continue
            except RayActorError:
                pass
            self._end(entry)

    def shutdown(self) -> None:
        for entry in list(self.spares):
            self._end(entry)
