"""Health (issue: hangs in seconds, stragglers replaced, bad nodes kept out, corruption never
persisted), without Ray: the learnt hang limits, the policy's straggler and sdc decisions, the
preflight's verdicts, and the Watch turning a rank's sdc report into a fault."""

import pytest

from resilient.agents.heartbeat import Heartbeat
from resilient.agents.preflight import judge as preflight_judge
from resilient.agents.scripted import FakeClock, Scenario, ScriptedGroup
from resilient.anomaly.events import REPLACE, AnomalyEvent
from resilient.config import SupervisorConfig
from resilient.config.sections import CheckpointConfig
from resilient.supervisor import policy
from resilient.supervisor.faults import Action, Fault, FaultKind, History
from resilient.supervisor.hang_limits import SETTLE, UNLEARNT_S, WARM, HangLimits
from resilient.supervisor.watch import Watch

pytestmark = pytest.mark.timeout(30)
AUTO = SupervisorConfig(heartbeat_interval=0.1)


def steps(limits: HangLimits, gaps: list[float], rank: int = 0) -> None:
    t = 0.0
    limits.observe_steps([{"rank": rank, "t": t}])
    for g in gaps:
        t += g
        limits.observe_steps([{"rank": rank, "t": t}])


def test_auto_limits_follow_the_observed_pace_and_are_reported_when_they_move():
    limits = HangLimits(SupervisorConfig())
    assert limits.silence_s == limits.stall_s == UNLEARNT_S  # nothing seen yet
    steps(limits, [3.0] * SETTLE + [0.05] * WARM)  # a warming start is not the job's pace
    # one heartbeat interval of news, plus the larger of an interval and 5x the longest gap
    assert limits.stall_s == pytest.approx(2.0) and limits.silence_s == pytest.approx(2.0)
    first = limits.changed()
    assert first["stall_s"] == 2.0 and limits.changed() is None  # reported once
    steps(limits, [0.6])  # a persist's long step: room for it
    assert limits.stall_s == pytest.approx(1.0 + 5 * 0.6) and limits.changed()["stall_s"] == 4.0
    limits.observe_answer(1.0 + 0.4)  # a heartbeat answered 0.4 s late
    assert limits.silence_s == pytest.approx(1.0 + 5 * 0.4)
    limits.new_attempt()  # a restart warms up again: its first gaps teach nothing
    steps(limits, [3.0] * SETTLE)
    assert limits.stall_s == pytest.approx(4.0)


def test_a_number_is_fixed_and_a_resumed_supervisor_starts_from_its_journal():
    fixed = HangLimits(SupervisorConfig(hang_timeout=7.0))
    steps(fixed, [0.01] * 100)
    assert fixed.silence_s == fixed.stall_s == 7.0 and fixed.changed() is None
    resumed = HangLimits(SupervisorConfig(), {"silence_s": 2.5, "stall_s": 3.0})
    assert (resumed.silence_s, resumed.stall_s) == (2.5, 3.0)
    assert SupervisorConfig().hang_timeout == "auto"


def test_auto_hang_of_a_fast_job_is_declared_within_three_seconds():
    clock = FakeClock()
    sc = Scenario(step_s=0.03, heartbeat_s=1.0, hang={300: 1})
    group = ScriptedGroup(sc, ["n0", "n1"], 1000, clock)
    group.start(None, (), [])
    cfg = SupervisorConfig(heartbeat_interval=1.0)
    w = Watch(group, 0, 2, cfg, clock)
    for _ in range(100_000):
        seen = w.poll()
        if seen.fault:
            break
    f = seen.fault
    assert (f.kind, f.rank) == (FaultKind.HANG, 1)
    assert f.detected_at - sc.struck[("hang", 300)] <= 3.0, f.evidence


def test_a_straggler_is_replaced_alone_and_its_node_cordoned_the_second_time():
    cfg = SupervisorConfig()
    e = AnomalyEvent(1.0, "straggler", "warning", REPLACE, rank=1, step=50)
    v = policy.judge(e, ["n0", "n1"], {}, 50, 2.0)
    assert v.fault.node == "n1" and v.fault.suggested == REPLACE
    first = policy.decide(v.fault, History(), cfg)
    assert first.action == Action.RESTART and first.keep_survivors and not first.exclude_nodes
    again = policy.decide(v.fault, History(node_offences=1), cfg)
    assert again.action == Action.CORDON and again.exclude_nodes == ("n1",)
    alone = policy.decide(v.fault, History(node_offences=1, other_nodes=0), cfg)
    assert alone.action == Action.RESTART  # nowhere else to go: replaced again, not cordoned


def test_sdc_rolls_back_to_the_agreed_step_and_cordons_a_node_that_computes_wrong():
    cfg = SupervisorConfig()
    flip = Fault(FaultKind.SDC, 1, 140, 1.0, "", node="n1", suggested="replace", rollback_to=120)
    d = policy.decide(flip, History(), cfg)
    assert (d.action, d.rollback_to, d.exclude_nodes) == (Action.ROLLBACK, 120, ())
    assert d.keep_survivors and "replace rank 1" in d.reason  # the others load step 120
    again = policy.decide(flip, History(node_offences=1), cfg)
    assert again.exclude_nodes == ("n1",) and not again.keep_survivors  # cordon: a new group
    alone = policy.decide(flip, History(node_offences=1, other_nodes=0), cfg)
    assert alone.action == Action.ROLLBACK and alone.exclude_nodes == ()  # one machine: go on
    assert alone.keep_survivors
    off = cfg.model_copy(update={"keep_survivors": False})
    assert not policy.decide(flip, History(), off).keep_survivors
    nobody = Fault(FaultKind.SDC, None, 140, 1.0, "", node=None, rollback_to=120)
    assert not policy.decide(nobody, History(), cfg).keep_survivors  # no odd rank: all restart
    bad = Fault(FaultKind.SDC, 1, 120, 1.0, "", node="n1", suggested="cordon", rollback_to=60)
    d = policy.decide(bad, History(), cfg)
    assert (d.action, d.rollback_to, d.exclude_nodes) == (Action.ROLLBACK, 60, ("n1",))
    assert not d.keep_survivors


def test_the_watch_turns_an_sdc_report_into_a_fault_with_its_rollback_point():
    clock = FakeClock()
    group = ScriptedGroup(Scenario(), ["n0", "n1"], 100, clock)
    group.start(None, (), [])
    w = Watch(group, 0, 2, AUTO, clock)
    report = {"step": 40, "agreed": False, "odd": [1], "failed_audits": [], "culprits": [],
              "rank": 1, "rollback_to": 20, "digests": ["1", "2"]}  # fmt: skip
    hb = Heartbeat(rank=0, pid=1, phase="sdc", now=clock(), step=39, sdc=report)
    f = w._corrupt(clock(), {0: hb})
    assert (f.kind, f.rank, f.step, f.rollback_to, f.suggested) == (
        FaultKind.SDC, 1, 40, 20, "replace",
    )  # fmt: skip
    assert f.to_record()["kind"] == "sdc"


def test_preflight_fails_a_wrong_result_a_slow_node_and_a_full_disk():
    ok = {"compute_ok": True, "compute_s": 0.02, "allreduce_ok": True, "storage_ok": True,
          "mem_free_gb": 8.0, "disk_free_gb": 50.0}  # fmt: skip
    nodes = [
        {"node": "a", "index": 0, **ok},
        {"node": "b", "index": 1, **ok, "compute_ok": False},
        {"node": "c", "index": 2, **ok, "compute_s": 0.5},
        {"node": "d", "index": 3, **ok, "disk_free_gb": 0.2},
        {"node": "e", "index": 4, **ok, "compute_s": 0.045},  # noise: not far slower
    ]
    out = {r["node"]: r for r in preflight_judge(nodes)}
    assert out["a"]["ok"] and out["e"]["ok"]
    assert "known-answer" in out["b"]["reasons"][0]
    assert "median" in out["c"]["reasons"][0] and "disk" in out["d"]["reasons"][0]


def test_preflight_blames_no_node_for_an_all_reduce_that_failed_everywhere():
    good = {"compute_ok": True, "compute_s": 0.1, "storage_ok": True}
    cut = {"allreduce_ok": False, "allreduce_error": "Timeout"}
    out = preflight_judge(
        [{"node": "a", **good, **cut}, {"node": "b", **good, **cut}, {"node": "c", "error": "died"}]
    )
    assert [r["ok"] for r in out] == [True, True, False]  # the node that did not answer fails
    assert "every node" in out[0]["warnings"][0]
    one = preflight_judge(
        [{"node": "a", **good, "allreduce_ok": True}, {"node": "b", **good, **cut}]
    )
    assert [r["ok"] for r in one] == [True, False]  # a sum wrong on one node is that node's


def test_checks_cover_every_persisted_step_and_audits_stay_under_half_a_percent():
    c = CheckpointConfig(persist_every=10)
    assert all(c.checked(s) for s in range(10, 200, 10)) and not c.checked(5)
    for per_rank in (1.0, 4.0):  # microbatches a rank computes a step; an audit recomputes one
        audits = [s for s in range(1, 2001) if c.audited(s, per_rank)]
        assert audits and len(audits) / (2000 * per_rank) <= 0.005
        assert all(c.checked(s) for s in audits)
    assert not any(CheckpointConfig(verify_every=0).checked(s) for s in range(1, 100))


def test_an_sdc_rollback_leaves_no_uncompared_snapshot_in_memory():
    from resilient.checkpoint.memory import Entry, MemoryTier

    tier = MemoryTier(keep=5, max_pending=4)
    for s in (120, 130, 139):
        tier.put(Entry(s, {}, {}, role="memory", persist=s == 120))
    assert tier.forget_after(120) == [130, 139]
    assert [e["step"] for e in tier.inventory()] == [120]


def test_a_node_that_joins_is_checked_before_a_rank_may_land_there(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from resilient.agents.preflight import judge as preflight_judge
    from resilient.checkpoint.storage import CheckpointStore
    from resilient.config import validate_tree
    from resilient.rundir import RunDir
    from resilient.supervisor import fleet as fleet_mod

    checked = []

    def run_preflight(nodes, uri, options, bad):
        checked.append([n[1] for n in nodes])
        rows = [{"node": nid, "index": i, "compute_ok": nid != "bad", "compute_s": 0.01}
                for i, nid, _ in nodes]  # fmt: skip
        return preflight_judge(rows)

    monkeypatch.setattr(fleet_mod, "run_preflight", run_preflight)
    joined = [(0, "a", None)]

    class Nodes:
        writers = 0

        def every_node(self):
            return list(joined)

        def lost(self):
            return set()

        def placement(self, excluded, world, timeout, stand_ins):
            self.excluded = set(excluded)
            return ["a"]

    class Journal:
        def __init__(self):
            self.records = []

        def append(self, kind, **fields):
            self.records.append((kind, fields))

    spec = validate_tree({"name": "j", "data": {"path": "x"}, "checkpoint": {"storage": "s"}})
    store = CheckpointStore(RunDir(str(tmp_path)))
    parts = SimpleNamespace(nodes=Nodes(), spares=None, health=None, store=store)
    f = fleet_mod.Fleet(spec, parts, Journal(), {}, lambda: ())
    f.preflight(set())
    f.placement(2)
    assert checked == [["a"]]  # nothing new: no second check
    joined += [(1, "b", None), (2, "bad", None)]
    f.placement(2)
    # checked beside one that passed (an all-reduce needs a peer, a compute time a median)
    assert checked[1] == ["a", "b", "bad"] and "bad" in parts.nodes.excluded
    f.placement(2)
    assert len(checked) == 2  # each node once


def test_freed_heap_goes_back_at_most_once_a_minute(monkeypatch):
    import os
    import subprocess
    import sys

    from resilient import heap

    now = [0.0]
    trimmer = heap.Trimmer(60.0, clock=lambda: now[0])
    assert not trimmer.maybe()
    now[0] = 61.0
    assert trimmer.maybe() and not trimmer.maybe()
    monkeypatch.delenv(heap.ARROW_POOL, raising=False)  # this process's: put back afterwards
    heap.limit_arenas()  # glibc here: both are real calls, and harmless
    heap.trim()
    # Arrow on malloc (mimalloc keeps what the hourly metrics merge freed): in the launcher, and in
    # what it starts, before pyarrow is imported
    code = (
        "from resilient import heap; heap.limit_arenas(); import pyarrow; "
        "print(pyarrow.default_memory_pool().backend_name)"
    )
    env = {k: v for k, v in os.environ.items() if k != heap.ARROW_POOL}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "system", out.stderr[-500:]
