"""The node agent's heartbeat relay (agents.relay) against real Ray actors: what it hands the
supervisor (each heartbeat and each death once), and the lease renewals it passes on (never a
stale one: a node cut off renews none of its ranks)."""

import os
import signal
import threading
import time

import pytest
import ray

from resilient.agents.heartbeat import Heartbeat
from resilient.agents.node_agent import NodeAgent
from resilient.agents.relays import NodeRelays
from resilient.launcher.cluster import QUIET
from tests.helpers import LOWERED_NICE, niceness

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"lease": 1})
class Rank:
    """A rank without a model: a step per heartbeat asked, each with one record."""

    def __init__(self, rank: int):
        self.rank, self.step, self.renewed = rank, 0, []
        self.lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def heartbeat(self) -> Heartbeat:
        with self.lock:
            self.step += 1
            return Heartbeat(
                self.rank, os.getpid(), "training", time.time(), self.step,
                metrics=({"rank": self.rank, "step": self.step},),
            )  # fmt: skip

    @ray.method(concurrency_group="lease")
    def renew(self, sent_at: float) -> bool:
        self.renewed.append(sent_at)
        return True

    def renewals(self) -> list[float]:
        return list(self.renewed)


@pytest.fixture(scope="module")
def cluster():
    ray.init(  # "local": a cluster of its own, never one RAY_ADDRESS or /tmp/ray names
        address="local",
        num_cpus=2,
        _system_config=QUIET,  # workers at this process's niceness, as an embedded cluster's
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def agent(cluster, tmp_path):
    a = NodeAgent.remote("node-a", f"file://{tmp_path}/run", {}, None, 600.0)  # no renewals
    ray.get(a.info.remote())
    yield a
    ray.kill(a)


def ranks(n: int) -> dict:
    actors = [Rank.remote(r) for r in range(n)]
    pids = ray.get([a.pid.remote() for a in actors])
    return {r: (a, pid) for r, (a, pid) in enumerate(zip(actors, pids, strict=True))}


def gather_until(relays: NodeRelays, want, timeout: float = 20.0):
    """Gathers (one per call of `issue`) until `want(beats, dead)` holds."""
    beats, dead = [], {}
    deadline = time.time() + timeout
    while time.time() < deadline:
        relays.issue(time.time(), 0.0)
        for ref, node in relays.refs.items():
            _, got, died, _ = relays.answer(ref, node)
            beats += got or []
            dead.update(died)
        if want(beats, dead):
            return beats, dead
    raise AssertionError(f"not seen in {timeout}s: {len(beats)} beats, dead {dead}")


def test_the_agents_main_thread_runs_below_its_other_threads_after_its_first_call(agent):
    pid = ray.get(agent.info.remote())["pid"]
    nice = niceness(pid)
    assert nice.pop(pid) == LOWERED_NICE and max(nice.values()) < LOWERED_NICE, nice


def test_each_heartbeat_and_each_death_is_handed_over_once(agent):
    attached = ranks(3)
    relays = NodeRelays()
    relays.attach({"node-a": (agent, attached)})
    assert all(r in relays for r in range(3))
    beats, _ = gather_until(relays, lambda b, d: len({r for r, _ in b}) == 3)
    steps = [(r, m["step"]) for r, h in beats for m in h.metrics]
    assert len(steps) == len(set(steps))  # no record twice

    ray.kill(attached[1][0])
    _, dead = gather_until(relays, lambda b, d: 1 in d)
    assert set(dead) == {1}
    later, dead = gather_until(relays, lambda b, d: {0, 2} <= {r for r, _ in b})
    assert 1 not in dead and 1 not in {r for r, _ in later}  # reported once, not polled again


def test_an_older_group_gets_nothing_and_cannot_take_the_ranks_back(agent):
    old, new = NodeRelays(), NodeRelays()
    old.attach({"node-a": (agent, ranks(1))})
    new.attach({"node-a": (agent, ranks(2))})
    got = ray.get(agent.gather.remote(old.seq, 0.5))
    assert got["beats"] == [] and got["seq"] == new.seq
    ray.get(agent.attach.remote(old.seq, {}))  # a late attach of the older group: ignored
    beats, _ = gather_until(new, lambda b, d: {r for r, _ in b} == {0, 1})


def test_renewals_are_passed_on_but_never_a_stale_one(agent):
    attached = ranks(2)
    relays = NodeRelays()
    relays.attach({"node-a": (agent, attached)})

    def renewals_reach_ranks(n: int, what: str) -> None:
        deadline = time.time() + 10
        while not all(
            len(x) >= n for x in ray.get([a.renewals.remote() for a, _ in attached.values()])
        ):
            assert time.time() < deadline, f"{what} never reached the ranks"
            time.sleep(0.05)

    assert ray.get(agent.renew.remote(time.time())) is True
    renewals_reach_ranks(1, "the renewal")
    # a heartbeat gather carries a renewal too (the LeaseKeeper then skips that agent)
    relays.issue(time.time(), 0.0)
    ray.get(list(relays.refs))
    renewals_reach_ranks(2, "the gather's renewal")
    before = ray.get([a.renewals.remote() for a, _ in attached.values()])
    # held back by a partition, delivered late: the agent refuses it and passes nothing on
    assert ray.get(agent.renew.remote(time.time() - 30)) is False
    time.sleep(0.5)  # what it would have passed on (fire and forget) has landed by now
    assert ray.get([a.renewals.remote() for a, _ in attached.values()]) == before


def test_a_held_gather_answers_at_once_when_a_rank_dies(agent):
    attached = ranks(2)
    relays = NodeRelays()
    relays.attach({"node-a": (agent, attached)})
    ray.get(agent.gather.remote(relays.seq, 0.25, 0.0))  # a round of heartbeats now
    held = agent.gather.remote(relays.seq, 0.25, 60.0)  # the next: in a minute, unless a rank dies
    t0 = time.time()
    os.kill(attached[1][1], signal.SIGKILL)
    got = ray.get(held, timeout=20)
    assert set(got["dead"]) == {1} and time.time() - t0 < 5
    # a gather that does not hold ends a held one: the last gather before a teardown never waits
    # (numbered as the relays number theirs: the agent may take the two in either order)
    held = agent.gather.remote(relays.seq, 0.25, 60.0, 0.0, order=relays.order)
    t0 = time.time()
    beats, _ = relays.final(timeout=10)
    assert ray.get(held, timeout=10)["seq"] == relays.seq and time.time() - t0 < 5
    assert 0 in {r for r, _ in beats} | {r for r, _ in ray.get(held)["beats"]}


def test_a_gather_sent_before_the_last_one_holds_not_whenever_it_arrives(agent):
    """The agent's two threads may take a held gather after the final one sent later: the
    sender's numbering (`order`) ends it all the same; one sent after the final one holds."""
    relays = NodeRelays()
    relays.attach({"node-a": (agent, ranks(1))})
    ray.get(agent.gather.remote(relays.seq, 0.25, 0.0, 0.0, order=5))  # the last, arrived first
    t0 = time.time()
    late = agent.gather.remote(relays.seq, 0.25, 60.0, 0.0, order=4)  # sent before it
    assert ray.get(late, timeout=20)["seq"] == relays.seq and time.time() - t0 < 5
    after = agent.gather.remote(relays.seq, 0.25, 60.0, 0.0, order=6)
    assert not ray.wait([after], timeout=1.0)[0]  # held: sent after the cut
    ray.get(agent.gather.remote(relays.seq, 0.25, 0.0, 0.0, order=7))
    assert ray.get(after, timeout=20)["seq"] == relays.seq


@ray.remote(num_cpus=0, max_concurrency=4)
class LateAgent:
    """A node agent that takes its ranks, then answers each gather `delay_s` late (stopped,
    overloaded), with one heartbeat of rank 0."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def attach(self, seq: int, ranks: dict) -> None:
        pass

    def gather(self, seq: int, wait_s: float, every_s=0.0, sent_at=0.0, order=None) -> dict:
        time.sleep(self.delay_s)
        hb = Heartbeat(0, os.getpid(), "training", time.time(), 1, metrics=({"step": 1},))
        return {"seq": seq, "beats": [(0, hb)], "dead": {}, "waiting": [0]}


def test_a_late_gather_is_still_read_after_its_ranks_were_handed_back(cluster):
    """The heartbeats a late gather carries were handed out once: they still reach the caller,
    and its ranks stay with direct heartbeats (none of them awaited through it again)."""
    relays = NodeRelays()
    relays.attach({"node-s": (LateAgent.remote(2.0), ranks(1))})
    now = time.time()
    assert relays.issue(now, 0.4) == ([0], [])
    assert relays.issue(now + 0.7, 0.4) == ([], [0])  # overdue: handed back
    assert 0 not in relays and list(relays.refs.values()) == ["node-s"]
    ref = ray.wait(list(relays.refs), timeout=20)[0][0]
    node, beats, dead, waiting = relays.answer(ref, "node-s")
    assert [r for r, _ in beats] == [0] and beats[0][1].metrics == ({"step": 1},)
    assert waiting == [] and not relays.refs


def test_an_agent_that_does_not_answer_hands_its_ranks_back(cluster):
    relays = NodeRelays()
    relays.attach({"node-s": (LateAgent.remote(60.0), ranks(2))})
    now = time.time()
    assert relays.issue(now, 1.0) == ([0, 1], [])
    assert relays.renewing(1.0) == {"node-s"}  # the gather carried the lease renewal
    assert relays.issue(now + 1.0, 1.0) == ([], [])  # not overdue yet
    assert relays.issue(now + 1.6, 1.0) == ([], [0, 1])  # 1 s + 0.25 s to answer + 0.25 s late
    assert 0 not in relays and 1 not in relays and not relays.inflight


def test_a_supervisor_away_finds_no_agent_late_for_it(cluster):
    """Its process stopped for seconds (Ctrl-Z, a paused VM), the supervisor comes back to answers
    it has not read yet: the time away is not the agent's, whose gather is due that much later."""
    relays = NodeRelays()
    relays.attach({"node-s": (LateAgent.remote(60.0), ranks(2))})
    now = time.time()
    assert relays.issue(now, 1.0) == ([0, 1], [])
    assert relays.issue(now + 5.0, 1.0) == ([], [])  # back after 5 s away
    assert relays.issue(now + 5.5, 1.0) == ([], [])
    assert relays.issue(now + 6.0, 1.0) == ([], [])
    assert relays.issue(now + 6.6, 1.0) == ([], [0, 1])  # late in time watched
