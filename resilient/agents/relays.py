"""NodeRelays: the supervisor's side of the node agents' heartbeat relay (agents.relay).

Contract: `relayed(spec, world)` says whether a group of `world` ranks is polled through its node
agents (`supervisor.heartbeat_relay`: "on", "off", or "auto": from RELAY_FROM ranks on, where the
driver's per-rank calls begin to cost; below it a direct call per rank is cheaper in all).
`attach(by_node)` hands each node agent its ranks ({node: (agent, {rank: (actor, pid)})}) under a
new sequence number and keeps the nodes whose agent took them within ATTACH_S (the others' ranks
stay polled directly); `rank in relays` says whether a rank is polled through its agent. `issue(now,
interval)` keeps one gather in flight per node: sent as soon as the previous one came back, it holds
on the agent until `interval` after the agent's previous round of heartbeats (a death on the node
ends the hold: it is heard of at once), so each rank is asked once per interval. It returns (the
ranks now awaited through a gather, the ranks handed back to direct heartbeats: those of a node
whose gather is STUCK_S overdue, an agent stopped or overloaded, whose ranks must not look silent
for it; a supervisor away past `AWAY_S` moves every due time on by as long: an answer that came
meanwhile waits unread, and its agent is not late). Each gather carries the supervisor's lease
renewal (`sent_at`: the agent renews its own lease and, if it took it, its ranks'), so
`renewing(within_s)` names the nodes the `LeaseKeeper` need not renew itself: one call per node per
interval in all. `refs` maps the gathers in flight to their nodes (a handed-back node's late gather
too: it is read when it comes, for the heartbeats the agent took for it); `answer(ref, node)` turns
a gather's answer into (node, [(rank, heartbeat)], deaths, ranks still owing one), heartbeats None
when the agent died, failed or was attached by someone else since (its ranks are polled directly
from then on). `forget(ranks)` detaches ranks replaced or ended (None: all) from their agents, so
none passes renewals on to them.
`final(timeout)` gathers once more from every node, without holding (which ends the held ones), and
waits for those and the ones in flight: every heartbeat the ranks still owed, before a teardown.
"""

from __future__ import annotations

import logging
import time

import ray

from resilient.agents.heartbeat import AWAY_S

log = logging.getLogger(__name__)

RELAY_FROM = 16  # "auto": ranks from which their node agents relay the heartbeats
AGENT_WAIT_S = 0.25  # a gather waits this long (at most a quarter interval) for its node's ranks
ATTACH_S = 3.0  # an agent that takes its ranks slower than this is passed over: direct calls
# A gather this late (past its hold and wait; at most a quarter interval) hands its ranks to direct
# calls: before the Watch's silence limit (two intervals at least) could call them hung.
STUCK_S = 0.25


def relayed(spec, world: int) -> bool:
    mode = spec.supervisor.heartbeat_relay
    return mode == "on" or (mode == "auto" and world >= RELAY_FROM)


class NodeRelays:
    def __init__(self):
        self.seq = 0
        self.agents: dict[str, object] = {}  # the nodes whose agents relay: each one's agent
        self.node_of: dict[int, str] = {}  # the ranks relayed: each one's node
        self.inflight: dict[str, ray.ObjectRef] = {}
        # gathers of nodes handed back for being late, still read when they come: the heartbeats
        # in them were handed out once (and carry step records)
        self.late: dict[ray.ObjectRef, str] = {}
        self.order = 0  # the gathers sent, numbered (agents.relay: a later cut ends a hold)
        self.due: dict[str, float] = {}  # when each gather in flight should be back
        self.sent_at: dict[str, float] = {}  # when each node's last gather (and renewal) left
        self.members: dict[str, dict[int, tuple[object, int]]] = {}  # what each agent was given
        self.attached: dict[str, object] = {}  # every agent given ranks, dropped or not
        self.issued: float | None = None  # when the supervisor last issued gathers

    def attach(self, by_node: dict[str, tuple[object, dict[int, tuple[object, int]]]]) -> None:
        # a sequence that only grows, across groups too: an agent ignores an older group's attach
        self.seq = max(self.seq + 1, time.time_ns())
        self.agents, self.node_of, self.inflight = {}, {}, {}
        self.members = {node: dict(ranks) for node, (_, ranks) in by_node.items()}
        self.attached = {node: a for node, (a, _) in by_node.items()}
        refs = {node: a.attach.remote(self.seq, ranks) for node, (a, ranks) in by_node.items()}
        ready = ray.wait(list(refs.values()), num_returns=len(refs), timeout=ATTACH_S)[0]
        for node, ref in refs.items():
            if ref not in ready:  # the agent is slow: its ranks are polled directly
                continue
            try:
                ray.get(ref)
            except Exception:  # the agent died or failed: the same
                continue
            self.agents[node] = by_node[node][0]
            self.node_of.update(dict.fromkeys(self.members[node], node))

    def __contains__(self, rank: int) -> bool:
        return rank in self.node_of

    def issue(self, now: float, interval: float) -> tuple[list[int], list[int]]:
        """Send the gathers due: (the ranks now awaited through one, the ranks handed back)."""
        asked, released = [], []
        wait_s, late_s = min(AGENT_WAIT_S, interval / 4), min(STUCK_S, interval / 4)
        if self.issued is not None and now - self.issued > AWAY_S:  # the supervisor was away
            for node in self.due:
                self.due[node] += now - self.issued
        self.issued = now
        for node, agent in list(self.agents.items()):
            if node in self.inflight:
                if now > self.due[node] + late_s:
                    log.warning(
                        "the node agent on %s did not answer its heartbeat gather in time: its "
                        "ranks are asked directly from now on",
                        node[:12],
                    )
                    released += sorted(self.members[node])
                    self.late[self.inflight[node]] = node
                    self.drop(node)
                continue
            self.order += 1
            self.inflight[node] = agent.gather.remote(
                self.seq, wait_s, interval, now, order=self.order
            )
            self.due[node], self.sent_at[node] = now + interval + wait_s, now
            asked += sorted(self.members[node])
        return asked, released

    @property
    def refs(self) -> dict:
        return {ref: node for node, ref in self.inflight.items()} | self.late

    def renewing(self, within_s: float) -> set[str]:
        """The nodes whose agents were sent a renewal with a gather within the last `within_s`."""
        now = time.time()
        return {n for n, t in list(self.sent_at.items()) if now - t < within_s and n in self.agents}

    def answer(self, ref, node: str) -> tuple[str, list | None, dict, list]:
        """A gather that came back: (node, heartbeats, deaths, ranks still owing one); heartbeats
        None when the agent is gone (its ranks are then polled directly). A late gather (its node
        handed back) gives what it got, and no ranks owing one: they are asked directly."""
        late = self.late.pop(ref, None) is not None
        if not late:
            self.inflight.pop(node, None)
        try:
            got = ray.get(ref)
        except Exception:  # the agent died (or its gather failed): direct heartbeats
            got = None
        if got is None or got["seq"] != self.seq:  # or re-attached by someone else since
            self.drop(node)
            return node, ([] if late else None), {}, []
        return node, got["beats"], got["dead"], ([] if late else got["waiting"])

    def drop(self, node: str) -> None:
        self.agents.pop(node, None)
        self.inflight.pop(node, None)
        for rank in self.members.get(node, ()):
            if self.node_of.get(rank) == node:
                del self.node_of[rank]

    def forget(self, ranks) -> None:
        """These ranks are replaced or ended (all of them: `ranks` None): no agent polls them or
        passes renewals on to them any more, a dropped node's agent included."""
        for node, members in self.members.items():
            gone = set(members) if ranks is None else set(ranks) & set(members)
            agent = self.attached.get(node)
            if not gone or agent is None:
                continue
            for rank in gone:
                del members[rank]
                self.node_of.pop(rank, None)
            try:  # the same sequence: the agent keeps what it owes the others
                agent.attach.remote(self.seq, dict(members))
            except Exception:  # the agent is gone: it passes nothing on
                pass

    def final(self, timeout: float) -> tuple[list, dict]:
        """Every heartbeat and death the nodes' ranks still owed (within `timeout`): [(rank,
        heartbeat)] in the order the ranks answered, {rank: why}."""
        # no renewal rides on these: a node just written off must not be renewed; the agents have
        # what is left of `timeout` after a round trip to wait for their ranks
        self.order += 1
        wait_s = max(AGENT_WAIT_S, timeout - AGENT_WAIT_S)
        ask = {
            a.gather.remote(self.seq, wait_s, 0.0, 0.0, order=self.order): n
            for n, a in self.agents.items()
        }
        refs = {**self.refs, **ask}
        self.inflight = {}
        ready = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)[0] if refs else []
        beats, dead = [], {}
        for ref in ready:
            _, got, died, _ = self.answer(ref, refs[ref])
            beats += got or []
            dead.update(died)
        return sorted(beats, key=lambda b: b[1].now), dead
