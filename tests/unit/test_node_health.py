"""Node health (no Ray): a node that answers nothing is lost or cut off, told apart by its raylet;
a live raylet clears it; a rank's death on a dead node is the node's loss, one fault; the policy
cordons such a node and keeps the ranks elsewhere."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from resilient.config import SupervisorConfig
from resilient.supervisor import policy
from resilient.supervisor.faults import Action, Fault, FaultKind, History
from resilient.supervisor.health import OK, REFUSED, UNREACHABLE, NodeHealth, probe

pytestmark = pytest.mark.timeout(60)


class Group:
    """Two ranks: rank 0 on node a, rank 1 on node b; answers as the test sets them."""

    def __init__(self, now: float):
        self.size = 2
        self.placement = ["a", "b"]
        self.last_answer = {0: now, 1: now}

    def node_of(self, rank: int) -> str:
        return self.placement[rank]


class Nodes:
    def __init__(self, now: float):
        self.answers = {"a": now, "b": now}

    def address_of(self, node: str):
        return (node, 1)

    def answered_at(self, node: str):
        return self.answers.get(node)


def settled(health: NodeHealth, group, now: float) -> Fault | None:
    """`check` until the probe it started has answered (it runs on a thread)."""
    for _ in range(100):
        fault = health.check(group, now, 8)
        probes = list(health._probes.values())
        if fault:  # a node's fault is returned once: it is acted on
            return fault
        if all(p.thread and not p.thread.is_alive() for p in probes):
            return health.check(group, now, 8)
        time.sleep(0.01)
    raise AssertionError("probe never answered")


@pytest.mark.parametrize(
    ("raylet", "kind"), [(REFUSED, FaultKind.NODE_LOSS), (UNREACHABLE, FaultKind.PARTITION)]
)
def test_a_silent_node_is_lost_or_cut_off_by_what_its_raylet_says(raylet, kind):
    t0 = 1000.0
    group, nodes = Group(t0), Nodes(t0)
    probed = []
    health = NodeHealth(nodes, silent_s=2.5, prober=lambda addr, t: probed.append(addr) or raylet)
    group.last_answer[0] = t0 + 3  # rank 0 answers; node b (rank 1 and its agent) goes quiet
    nodes.answers["a"] = t0 + 3
    assert health.check(group, t0 + 2, 8) is None and not probed  # not silent long enough
    fault = settled(health, group, t0 + 3)
    assert probed == [("b", 1)]  # only the silent node is probed
    assert fault.kind == kind and fault.node == "b" and fault.rank == 1 and fault.step == 8
    assert "ranks [1]" in fault.evidence
    assert health.check(group, t0 + 3.1, 8) is None  # returned once: it is acted on


def test_a_node_whose_raylet_answers_is_not_lost_and_a_rank_that_answers_clears_it():
    t0 = 1000.0
    group, nodes = Group(t0), Nodes(t0)
    health = NodeHealth(nodes, silent_s=2.5, prober=lambda addr, t: OK)
    assert settled(health, group, t0 + 5) is None  # everything silent, yet the raylets answer
    group.last_answer[1] = nodes.answers["b"] = t0 + 5
    group.last_answer[0] = nodes.answers["a"] = t0 + 5
    assert health.check(group, t0 + 6, 8) is None and not health._probes  # answers reset it


def test_an_agent_that_answers_keeps_its_node_alive_while_its_ranks_are_quiet():
    t0 = 1000.0
    group, nodes = Group(t0), Nodes(t0)
    health = NodeHealth(nodes, silent_s=2.5, prober=lambda addr, t: REFUSED)
    nodes.answers = {"a": t0 + 9, "b": t0 + 9}  # the agents answer; ranks stuck (a hang's case)
    assert health.check(group, t0 + 10, 8) is None and not health._probes


def test_a_death_on_a_dead_node_is_that_nodes_loss_else_stays_a_crash():
    t0 = 1000.0
    group, nodes = Group(t0), Nodes(t0)
    group.placement = ["a", "a"]  # both ranks on node a
    crash = Fault(FaultKind.CRASH, 1, 5, t0, "The actor died unexpectedly", node="a")
    dead = NodeHealth(nodes, prober=lambda addr, t: REFUSED).explain(crash, group)
    assert dead.kind == FaultKind.NODE_LOSS and dead.node == "a" and dead.rank == 0
    assert "ranks [0, 1]" in dead.evidence and "actor died" in dead.evidence
    alive = NodeHealth(nodes, prober=lambda addr, t: OK).explain(crash, group)
    assert alive == crash


def test_probe_tells_refused_from_listening():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    try:
        assert probe(("127.0.0.1", port), 1.0) == OK
    finally:
        server.close()
    assert probe(("127.0.0.1", port), 1.0) == REFUSED
    assert probe(None, 1.0) == OK  # nothing known: never guessed dead


@pytest.mark.parametrize("kind", [FaultKind.NODE_LOSS, FaultKind.PARTITION])
def test_policy_cordons_a_lost_node_and_keeps_the_other_ranks(kind):
    cfg = SupervisorConfig()
    fault = Fault(kind, 1, 9, 0.0, "node b: ...", node="b" * 20)
    d = policy.decide(fault, History(), cfg)
    assert d.action == Action.RESTART and d.keep_survivors and d.delay_s == 0
    assert d.exclude_nodes == ("b" * 20,) and "cordon" in d.reason
    off = policy.decide(fault, History(), cfg.model_copy(update={"keep_survivors": False}))
    assert off.exclude_nodes == ("b" * 20,) and not off.keep_survivors
    assert fault.to_record()["kind"] == kind.value


def test_checks_never_wait_for_a_probe():
    t0 = 1000.0
    group, nodes = Group(t0), Nodes(t0)
    gate = threading.Event()
    health = NodeHealth(nodes, prober=lambda addr, t: gate.wait(5) and UNREACHABLE)
    start = time.monotonic()
    assert health.check(group, t0 + 5, 8) is None  # the probe runs on its own thread
    assert time.monotonic() - start < 0.5
    gate.set()
    assert settled(health, group, t0 + 5).kind == FaultKind.PARTITION
