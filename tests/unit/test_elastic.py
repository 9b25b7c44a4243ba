"""Elastic recovery: the sizing policy (pure) and the supervisor keeping survivors, shrinking when
a node is lost, growing back when it returns, waiting for capacity and resizing on request, driven
through whole jobs on a scripted group."""

import pytest

from resilient.agents.scripted import Scenario
from resilient.supervisor import elastic, policy
from resilient.supervisor.faults import Fault, FaultKind, History
from tests.unit.fakes import FakeNodes, Job

pytestmark = pytest.mark.timeout(60)


def test_size_runs_on_what_fits_between_min_and_target():
    assert elastic.size(3, 3, 2, 0, 60) == elastic.Sizing("run", 3, "3 rank(s)")
    s = elastic.size(2, 3, 2, 0, 60)
    assert (s.action, s.world) == ("run", 2) and "2 of 3" in s.reason
    assert elastic.size(9, 2, 1, 0, 60).world == 2  # never more than the target


def test_size_waits_for_capacity_then_fails_naming_the_keys():
    s = elastic.size(1, 3, 2, 10, 60)
    assert s.action == "wait" and "capacity_wait_s=60" in s.reason
    s = elastic.size(1, 3, 2, 60, 60)
    assert s.action == "fail" and "cluster.min_workers" in s.reason and "--resume" in s.reason


def test_wants_resize_grows_with_capacity_and_shrinks_on_request():
    assert elastic.wants_resize(2, 3, 3, 2) == 3  # capacity came back
    assert elastic.wants_resize(2, 3, 2, 2) is None  # not yet
    assert elastic.wants_resize(3, 2, 3, 2) == 2  # `resilient scale --workers 2`
    assert elastic.wants_resize(3, 3, 3, 2) is None


def test_policy_replaces_only_the_failed_rank_of_a_crash():
    crash = Fault(FaultKind.CRASH, 1, 5, 0.0, "gone")
    d = policy.decide(crash, History(), _cfg())
    assert d.action == "restart" and d.keep_survivors and "replace rank 1" in d.reason
    stall = Fault(FaultKind.HANG, None, 5, 0.0, "no step")
    assert not policy.decide(stall, History(), _cfg()).keep_survivors
    xid = Fault(FaultKind.ANOMALY, 1, 5, 0.0, "xid", node="n", suggested="cordon")
    assert not policy.decide(xid, History(), _cfg()).keep_survivors
    off = _cfg().model_copy(update={"keep_survivors": False})
    assert not policy.decide(crash, History(), off).keep_survivors


def _cfg():
    from resilient.config import SupervisorConfig

    return SupervisorConfig()


def test_a_crash_replaces_one_rank_and_keeps_the_other(tmp_path):
    job = Job(tmp_path, Scenario(crash={12: 1}))
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["world_size"] == 2
    (kept,) = job.of("survivors")
    assert kept["replaced"] == [1] and kept["kept"] == [0]
    r0, r1 = s["ranks"]
    assert (r0["restarts"], r1["restarts"]) == (0, 1) and r0["pid"] == 1000
    assert len(job.groups) == 1 and len(job.scenario.starts) == 2  # one group, re-formed


def _three(tmp_path, scenario: Scenario, **supervisor) -> Job:
    spec = {"cluster": {"num_workers": 3, "min_workers": 2}, "supervisor": supervisor}
    job = Job(tmp_path, scenario, steps=60, spec=spec)
    job.nodes = FakeNodes(job.scenario, n=3)
    return job


def test_a_lost_node_shrinks_the_job_and_its_return_grows_it_back(tmp_path):
    job = _three(tmp_path, Scenario(crash={10: 2}))

    def node_weather():
        if ("crash", 10) in job.scenario.struck and job.scenario.starts[-1][1] == 3:
            job.nodes.gone = {"node2"}  # the crash was the node going down
        if job.groups and job.scenario.starts[-1][1] == 2 and job.groups[-1].step >= 25:
            job.nodes.gone = set()  # it is back

    job.stop_when = lambda: node_weather() and False
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["step"] == 60
    assert [(r["from"], r["to"]) for r in s["resizes"]] == [(3, 2), (2, 3)]
    assert s["resizes"][0]["step"] == 9 and "crash of rank 2" in s["resizes"][0]["reason"]
    assert s["world_size"] == 3 and [w for _, w in job.scenario.starts] == [3, 2, 3]
    assert "RESIZING" in [r["to"] for r in job.of("transition")]
    trained = [st for st, _ in job.scenario.data]
    assert sorted(set(trained)) == list(range(1, 61))  # the grow paused at a step: none lost


def test_too_few_nodes_waits_for_capacity_then_fails(tmp_path):
    job = _three(tmp_path, Scenario(crash={10: 2}), capacity_wait_s=30)

    def lose_two():
        if ("crash", 10) in job.scenario.struck:
            job.nodes.gone = {"node1", "node2"}

    job.stop_when = lambda: lose_two() and False
    s = job.run()
    assert s["state"] == "FAILED" and "cluster.min_workers" in s["reason"]
    assert "capacity_wait_s=30" in s["reason"]
    assert [r["to"] for r in job.of("transition")][-2:] == ["RESIZING", "FAILED"]


def test_scale_request_shrinks_at_the_next_step_and_grows_back(tmp_path):
    job = _three(tmp_path, Scenario())

    def operator():
        step = job.groups[-1].step if job.groups else 0
        job.control.scale_to = 2 if 10 <= step < 30 and len(job.scenario.starts) == 1 else None

    job.stop_when = lambda: operator() and False
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 0 and s["faults"] == []
    assert [(r["from"], r["to"]) for r in s["resizes"]] == [(3, 2), (2, 3)]
    assert "resilient scale" in s["resizes"][0]["reason"]


def test_a_scale_request_before_the_first_group_is_said_to_be_the_cause(tmp_path):
    """`resilient scale` while the job starts: its first group already has the size asked for,
    nothing paused for it, and the resize says the request was the cause (the old code said
    "capacity", as if the cluster had been short)."""
    job = _three(tmp_path, Scenario())

    def operator():
        job.control.scale_to = 2

    job.stop_when = lambda: operator() and False
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["world_size"] == 2
    (r,) = s["resizes"]
    assert (r["from"], r["to"]) == (3, 2)
    assert r["reason"].startswith("resilient scale asked for 2 rank(s)"), r["reason"]


def test_a_grow_ray_cannot_place_goes_back_to_the_size_it_had(tmp_path):
    job = _three(tmp_path, Scenario(crash={10: 2}))

    def node_weather():
        if ("crash", 10) in job.scenario.struck and job.scenario.starts[-1][1] == 3:
            job.nodes.gone = {"node2"}
        if job.groups and job.scenario.starts[-1][1] == 2 and job.groups[-1].step >= 25:
            job.nodes.gone, job.nodes.unplaceable = set(), {3}  # back, but held by others

    job.stop_when = lambda: node_weather() and False
    s = job.run()
    assert s["state"] == "SUCCEEDED" and s["world_size"] == 2
    assert [(r["from"], r["to"]) for r in s["resizes"]] == [(3, 2), (2, 3), (3, 2)]
    assert "did not place" in s["resizes"][2]["reason"]


def test_a_survivors_broken_collective_is_told_apart_from_a_failure():
    """A survivor's step fails on its dead peer: one warning line in its log, not "rank 0 failed"
    and a gloo traceback (which read as if the survivor were the fault)."""
    from resilient.agents.worker import peer_broke

    gloo = RuntimeError(
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
        "[127.0.0.1]:46819. This is typically caused by a remote worker crashing."
    )
    assert peer_broke(gloo)
    assert not peer_broke(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not peer_broke(ValueError("bad batch"))
