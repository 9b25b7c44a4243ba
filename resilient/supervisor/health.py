"""Node health: a node that answers nothing is lost or cut off, not a slow rank.

Contract: `NodeHealth(nodes, silent_s, probe)` watches the nodes the running group's ranks are on.
`check(group, now, step)` returns one Fault for a node, of kind NODE_LOSS (its raylet refuses
connections: the node's processes are gone) or PARTITION (its raylet does not answer at all: the
network to it is cut), once nothing on that node has answered for `silent_s`: no heartbeat of any
of its ranks and no answer of its node agent (looked for every CHECK_EVERY_S: O(ranks) each;
a silent node's answers and its probe are read on every call, and its fault is returned once).
Only then is its raylet probed, on a thread of its own (the watch loop never waits on a network
timeout), and a raylet that answers clears it: a stuck rank on a live node is the heartbeat
watchdog's (`hang_timeout`). `explain(fault, group)`
turns a rank's death into the loss of its node when that node's raylet refuses (probed at once,
briefly): one fault for the node, covering every rank and the agent on it, not one per rank and
not a restart placed on the dead node again. Both answer before Ray's own health checks do (tens
of seconds by default): what is lost here is excluded from placement at once.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from resilient.supervisor.faults import Fault, FaultKind

NODE_SILENT_S = 2.5  # nothing from a node (ranks, agent) for this long: probe its raylet
PROBE_TIMEOUT_S = 1.0  # a raylet that does not accept a connection this fast is unreachable
EXPLAIN_TIMEOUT_S = 0.5  # the probe behind a rank's death (a dead node refuses at once)
AGENT_QUIET_S = 1.5  # an agent (asked every second) silent this long at a rank's hang: probe
CHECK_EVERY_S = 0.5  # silences are looked for this often (they matter past NODE_SILENT_S)
OK, REFUSED, UNREACHABLE = "ok", "refused", "unreachable"


def probe(address: tuple[str, int] | None, timeout: float) -> str:
    """What a TCP connection to a raylet says: OK (it listens; the kernel accepts even for a busy
    or stopped process), REFUSED (nothing listens: the node's processes are gone) or UNREACHABLE
    (no answer: the network to the node is cut)."""
    if address is None:
        return OK  # nothing known to probe: never guess a node dead
    try:
        with socket.create_connection(address, timeout=timeout):
            return OK
    except ConnectionRefusedError:
        return REFUSED
    except OSError:  # timed out, no route to host, network unreachable
        return UNREACHABLE


@dataclass
class _Probe:
    at: float
    result: str | None = None
    thread: threading.Thread | None = None


class NodeHealth:
    def __init__(
        self,
        nodes,
        silent_s: float = NODE_SILENT_S,
        prober: Callable[[tuple[str, int] | None, float], str] = probe,
    ):
        """`nodes` gives `address_of(node_id)` (its raylet's (ip, port)) and `answered_at(node_id)`
        (when its agent last answered; None: no agent)."""
        self.nodes, self.silent_s, self.prober = nodes, silent_s, prober
        self._probes: dict[str, _Probe] = {}
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._group = None  # the group last scanned
        self._quiet: dict[str, list[int]] = {}  # its silent nodes and their ranks, at that scan

    def _silent_since(self, node: str, ranks: list[int], group) -> float:
        """When anything on `node` last answered (a rank's heartbeat, the agent)."""
        answers = [group.last_answer.get(r, 0.0) for r in ranks]
        agent = self.nodes.answered_at(node)
        return max(answers + ([agent] if agent is not None else []), default=0.0)

    def check(self, group, now: float, step: int) -> Fault | None:
        """The fault of the first node found lost or cut off (`step`: the step that runs)."""
        if group is not self._group or not 0 <= now - self._checked < CHECK_EVERY_S:
            # every rank is looked at: not on every poll (a new group, or a clock that went back,
            # is looked at now)
            self._group, self._checked = group, now
            self._quiet = self._scan(group, now)
        for node, ranks in list(self._quiet.items()):
            silent = now - self._silent_since(node, ranks, group)  # answers since the scan count
            if silent <= self.silent_s:
                del self._quiet[node]
                self._probes.pop(node, None)  # it answered: a later silence probes anew
                continue
            result = self._probe_async(node, now)
            if result in (REFUSED, UNREACHABLE):
                del self._quiet[node]  # acted on: not again from this scan
                self._probes.pop(node, None)
                return self._fault(node, ranks, result, silent, step, now)
        return None

    def _scan(self, group, now: float) -> dict[str, list[int]]:
        """The nodes silent past `silent_s` (their ranks that answered once); a node that
        answers has its probe forgotten."""
        by_node: dict[str, list[int]] = {}
        for rank in range(group.size):
            node = group.node_of(rank)
            if node is not None and rank in group.last_answer:
                by_node.setdefault(node, []).append(rank)
        quiet = {}
        for node, ranks in by_node.items():
            if now - self._silent_since(node, ranks, group) > self.silent_s:
                quiet[node] = ranks
            else:
                self._probes.pop(node, None)
        return quiet

    def _probe_async(self, node: str, now: float) -> str | None:
        """The result of this silence's probe of `node` (None while it runs, or if it said OK:
        a live raylet, so the node is not lost; a silence that goes on is probed again every
        `silent_s`)."""
        with self._lock:
            p = self._probes.get(node)
            if p is not None and p.result == OK and now - p.at > self.silent_s:
                p = None
            if p is None:
                p = self._probes[node] = _Probe(now)
                address = self.nodes.address_of(node)

                def run() -> None:
                    p.result = self.prober(address, PROBE_TIMEOUT_S)

                p.thread = threading.Thread(target=run, daemon=True, name="node-probe")
                p.thread.start()
        return p.result

    def explain(self, fault: Fault, group) -> Fault:
        """A rank's death, or the loss of its node when the node's raylet refuses connections; a
        rank's hang, or its node's loss or partition when the node's agent went silent too (a
        hang limit learnt from fast steps may come before `silent_s`: the node decides)."""
        if fault.kind not in (FaultKind.CRASH, FaultKind.HANG) or fault.rank is None:
            return fault
        node = fault.node or group.node_of(fault.rank)
        if node is None:
            return fault
        if fault.kind == FaultKind.HANG:
            agent = self.nodes.answered_at(node)
            if agent is None or fault.detected_at - agent <= AGENT_QUIET_S:
                return fault  # the node answers: a stuck rank
            result = self.prober(self.nodes.address_of(node), PROBE_TIMEOUT_S)
            if result == OK:
                return fault
        else:
            result = self.prober(self.nodes.address_of(node), EXPLAIN_TIMEOUT_S)
        if result not in (REFUSED, UNREACHABLE) or (
            fault.kind == FaultKind.CRASH and result != REFUSED
        ):
            return fault
        ranks = [r for r in range(group.size) if group.node_of(r) == node]
        lost = self._fault(node, ranks, result, 0.0, fault.step, fault.detected_at)
        return replace(lost, evidence=f"{lost.evidence}; first seen as: {fault.evidence}"[:500])

    def _fault(
        self, node: str, ranks: list[int], result: str, silent: float, step: int, now: float
    ) -> Fault:
        kind = FaultKind.NODE_LOSS if result == REFUSED else FaultKind.PARTITION
        why = (
            "its raylet refuses connections (the node's processes are gone)"
            if result == REFUSED
            else f"its raylet does not answer within {PROBE_TIMEOUT_S:g}s (the network to it is "
            "cut)"
        )
        quiet = f"nothing on it answered for {silent:.1f}s; " if silent else ""
        return Fault(
            kind,
            min(ranks),
            step,
            now,
            f"node {node[:12]} (ranks {ranks} and its agent): {quiet}{why}",
            node=node,
        )
