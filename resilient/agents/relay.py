"""Relay: a node agent asks the ranks on its node for their heartbeats, for the supervisor.

Why: one Ray call per rank per second (a heartbeat) plus one lease renewal per rank costs the
driver about a millisecond per rank-second (bench/fanin.py): most of a core at 1,024 ranks. Relayed,
the driver makes one call per node per heartbeat interval and renews one lease per node; the
per-rank calls are made on each node, by its agent, and cost that node, not the driver.

Contract, node side (`Relay`, held by a NodeAgent): `attach(seq, ranks)` names the ranks on this
node the supervisor's group polls through it ({rank: (actor, pid)}); a newer `seq` replaces them
(and drops the heartbeats the old ones still owe; its first gather holds not), an older one is
ignored. `gather(seq, wait_s, every_s, order)` first holds until `every_s` after its previous round
of heartbeats began, watching the ranks' processes every WATCH_S (a death ends the hold: the
supervisor, which keeps one gather in flight per node, hears of it at once; a new group's attach
ends it too, and so does a gather with `every_s` 0, which does not hold, sent after it: `order` is
the sender's numbering of its gathers, None: as they arrive), then keeps one heartbeat in flight
per attached rank, waits up to `wait_s` for them and answers {"seq": the attached seq, "beats":
[(rank, heartbeat)] of those that arrived, "dead": {rank: why} for each rank whose actor died or
whose process is gone, "waiting": the ranks still owing one}; each heartbeat and each death is
handed out once (gathers may run side by side: the agent gives them two threads), and a dead rank
is no longer polled. A gather for another `seq` answers nothing (the caller keeps waiting: its
attach is not here yet, or it is an old group's).
`renew(sent_at)` forwards the supervisor's lease renewal to every attached rank; the agent calls it
only when its own lease took the renewal, so a node cut off renews none of its ranks and they end
`fence_s` after the cut, as if renewed directly (agents.lease).
"""

from __future__ import annotations

import socket
import threading
import time

import psutil
import ray

WATCH_S = 0.1  # a held gather looks at its ranks' processes this often


def process_gone(pid: int) -> bool:
    """Whether the process `pid` on this machine has ended (gone, or a zombie not reaped yet)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def local_ips() -> set[str]:
    """This machine's IPv4 addresses (a rank at one of them runs here)."""
    return {
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    }


class Relay:
    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # an attach or a cut wakes a held gather
        self._arrived = 0  # gathers, numbered as they arrive
        # the newest gather that did not hold (a cut): (its arrival, the highest `order` of one):
        # the gathers that arrived before it, or were sent before it (by the sender's `order`:
        # the agent's two threads may take them in either order), hold no more
        self._cut: tuple[int, int] = (0, -1)
        self.seq = -1
        self.ranks: dict[int, tuple[object, int]] = {}
        self.inflight: dict[int, ray.ObjectRef] = {}
        self.round_at = float("-inf")  # when the last round of heartbeats began (monotonic)

    def attach(self, seq: int, ranks: dict[int, tuple[object, int]]) -> None:
        with self._lock:
            if seq < self.seq:
                return
            if seq > self.seq:  # a new group: its first round now, as a direct heartbeat would
                self.inflight, self.round_at = {}, float("-inf")
                self._cut = (self._cut[0], -1)  # the new group numbers its gathers anew
            self.seq, self.ranks = seq, dict(ranks)
            self._changed.notify_all()  # an older group's held gather ends now

    def renew(self, sent_at: float) -> None:
        for actor, _ in list(self.ranks.values()):
            try:
                actor.renew.remote(sent_at)
            except Exception:  # a dead actor: nothing to renew
                pass

    def gather(
        self, seq: int, wait_s: float, every_s: float = 0.0, order: int | None = None
    ) -> dict:
        with self._lock:
            self._arrived += 1
            mark = (self._arrived, -1 if order is None else order)
            if every_s <= 0 and seq == self.seq:
                self._cut = (mark[0], max(self._cut[1], mark[1]))
                self._changed.notify_all()
        dead = self._hold(seq, mark, self.round_at + every_s) if every_s > 0 else {}
        if dead:  # answered at once: the round waits for the next gather
            return self._answer(seq, [], dead)
        with self._lock:
            if seq != self.seq:
                return _nothing(self.seq)
            self.round_at = time.monotonic()
            ranks = dict(self.ranks)
            for rank, (actor, _) in ranks.items():
                if rank not in self.inflight:
                    self.inflight[rank] = actor.heartbeat.remote()
            mine = dict(self.inflight)
        ready = set(ray.wait(list(mine.values()), num_returns=len(mine), timeout=wait_s)[0])
        with self._lock:  # a concurrent gather may have taken some: each answer goes out once
            taken = [
                (r, ref) for r, ref in mine.items() if ref in ready and self.inflight.get(r) is ref
            ]
            for rank, _ in taken:
                del self.inflight[rank]
        beats = []
        for rank, ref in taken:
            try:
                beats.append((rank, ray.get(ref)))
            except Exception as e:  # the actor died (or the call failed): the rank is lost
                dead[rank] = (str(e).splitlines() or [type(e).__name__])[0][:300]
        dead.update(_gone({r: x for r, x in ranks.items() if r not in dead}))
        return self._answer(seq, beats, dead)

    def _answer(self, seq: int, beats: list, dead: dict[int, str]) -> dict:
        with self._lock:
            if seq != self.seq:  # re-attached meanwhile: these answers belong to no one
                return _nothing(self.seq)
            dead = {r: why for r, why in dead.items() if self.ranks.pop(r, None) is not None}
            for rank in dead:
                self.inflight.pop(rank, None)
            waiting = sorted(self.inflight)
        return {"seq": seq, "beats": beats, "dead": dead, "waiting": waiting}

    def _hold(self, seq: int, mark: tuple[int, int], deadline: float) -> dict[int, str]:
        """Until `deadline` (monotonic) with the ranks' processes watched every WATCH_S: the
        deaths seen (at once), or {} when the time is up, another group attached, or a gather
        that does not hold arrived or was sent after this one."""
        with self._lock:
            while seq == self.seq and not self._cut_off(mark):
                gone, left = _gone(self.ranks), deadline - time.monotonic()
                if gone or left <= 0:
                    return gone
                self._changed.wait(min(WATCH_S, left))
            return {}

    def _cut_off(self, mark: tuple[int, int]) -> bool:
        """Whether a cut was sent after the gather `mark` (arrival, order): by the sender's order
        when both are numbered, else by arrival."""
        arrived, order = mark
        if order >= 0 and self._cut[1] >= 0:
            return order < self._cut[1]
        return arrived < self._cut[0]


class RelayMethods:
    """The relay's actor methods, one definition for NodeAgent and bench/fanin.py's light agent: a
    mixin of a Ray actor class that declares the "relay" concurrency group (two threads) and has
    `self.relay` (a Relay) and `self.renew(sent_at)`, the path a gather's renewal takes (the
    agent's own lease first)."""

    @ray.method(concurrency_group="relay")
    def attach(self, seq: int, ranks: dict) -> None:
        """The ranks on this node whose heartbeats this agent relays."""
        self.relay.attach(seq, ranks)

    @ray.method(concurrency_group="relay")
    def gather(
        self,
        seq: int,
        wait_s: float,
        every_s: float = 0.0,
        sent_at: float = 0.0,
        order: int | None = None,
    ) -> dict:
        """The relayed ranks' heartbeats and deaths since the last gather; it carries the
        supervisor's lease renewal `sent_at` too (0: none)."""
        if sent_at:
            self.renew(sent_at)
        return self.relay.gather(seq, wait_s, every_s, order)


def _gone(ranks: dict[int, tuple[object, int]]) -> dict[int, str]:
    return {
        rank: f"the worker process {pid} of rank {rank} is gone"
        for rank, (_, pid) in ranks.items()
        if process_gone(pid)
    }


def _nothing(seq: int) -> dict:
    return {"seq": seq, "beats": [], "dead": {}, "waiting": []}
