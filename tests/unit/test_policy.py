import copy
import itertools
from dataclasses import replace

import pytest

from resilient.anomaly.events import AnomalyEvent
from resilient.config import SupervisorConfig
from resilient.supervisor import policy
from resilient.supervisor.faults import Action, Fault, FaultKind, History
from resilient.supervisor.policy import acted_on, also_cordon, backoff, decide, judge

pytestmark = pytest.mark.timeout(10)
FAULT = Fault(FaultKind.CRASH, 1, 14, 100.0, "actor died")


def test_restart_within_budget():
    cfg = SupervisorConfig(max_restarts=3)
    d = decide(FAULT, History(0), cfg)
    assert d.action is Action.RESTART and d.delay_s == 0.0
    assert "rank 1" in d.reason


def test_backoff_grows_and_is_capped():
    cfg = SupervisorConfig(max_restarts=10, backoff_base=1.0, backoff_max=5.0)
    assert [backoff(n, cfg) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert decide(FAULT, History(3), cfg).delay_s == 4.0


def test_gives_up_with_a_reason_when_budget_spent():
    cfg = SupervisorConfig(max_restarts=2)
    d = decide(FAULT, History(2), cfg)
    assert d.action is Action.GIVE_UP
    assert "max_restarts=2" in d.reason and "crash of rank 1 at step 14" in d.reason


def test_a_fault_while_stopping_gives_up_with_a_reason():
    d = decide(FAULT, History(0, stopping=True), SupervisorConfig())
    assert d.action is Action.GIVE_UP and "while stopping" in d.reason and "--resume" in d.reason


def test_a_fault_while_stopping_on_a_signal_ends_stopped():
    """A signal to the whole job can end a Ray cluster the user started, and the ranks with it: the
    end that was asked for, not a failure (an SRE's preemption must not page anyone)."""
    h = History(0, stopping=True, stop_signal="SIGTERM (preemption)")
    d = decide(FAULT, h, SupervisorConfig())
    assert d.action is Action.STOP
    assert "SIGTERM (preemption)" in d.reason and "crash of rank 1 at step 14" in d.reason
    # a signal without a stop under way changes nothing
    assert decide(FAULT, History(0, stop_signal="SIGTERM (preemption)"), SupervisorConfig()) == (
        decide(FAULT, History(0), SupervisorConfig())
    )


EVENTS = [
    AnomalyEvent(
        5.0, "gpu_xid", "critical", "cordon", node="nA", evidence={"xid": 79, "reason": "x"}
    ),
    AnomalyEvent(5.0, "gpu_xid", "critical", "cordon", node="nC", evidence={"xid": 79}),
    AnomalyEvent(5.0, "nan", "critical", "rollback", rank=0, step=12, evidence={"loss": "nan"}),
    AnomalyEvent(
        5.0, "loss_spike", "critical", "rollback", step=20, evidence={"spike_steps": [18, 19, 20]}
    ),
    AnomalyEvent(5.0, "straggler", "warning", "warn", rank=1, step=9),
    AnomalyEvent(5.0, "gpu_xid", "critical", "restart", node="nB", evidence={"xid": 13}),
]
PLACEMENT = ["nA", "nB"]
DATA = {12: {12}, 18: {19}, 19: {20}, 20: {21}}


def test_policy_is_pure(monkeypatch):
    """Same arguments, same answer; no clock, no I/O, no change to what it was given."""
    import builtins
    import time

    def forbidden(*a, **kw):
        raise AssertionError("the policy must not read the clock or do I/O")

    faults = [FAULT] + [judge(e, PLACEMENT, DATA, 11, 7.0).fault for e in EVENTS]
    cases = [
        (f, History(n, s)) for f in faults if f for n, s in itertools.product((0, 1, 5), (0, 1))
    ]
    before = copy.deepcopy((EVENTS, PLACEMENT, DATA))
    answers = [
        (decide(f, h, SupervisorConfig()), [judge(e, PLACEMENT, DATA, 11, 7.0) for e in EVENTS])
        for f, h in cases
    ]
    for name in ("time", "monotonic", "perf_counter"):
        monkeypatch.setattr(time, name, forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    again = [
        (decide(f, h, SupervisorConfig()), [judge(e, PLACEMENT, DATA, 11, 7.0) for e in EVENTS])
        for f, h in cases
    ]
    assert again == answers and (EVENTS, PLACEMENT, DATA) == before


def test_anomalies_map_to_cordon_and_rollback():
    cfg = SupervisorConfig()
    xid = Fault(
        FaultKind.ANOMALY,
        1,
        12,
        1.0,
        "gpu_xid",
        node="nodeA",
        anomaly="gpu_xid",
        suggested="cordon",
    )
    d = decide(xid, History(0), cfg)
    assert d.action is Action.CORDON and d.exclude_nodes == ("nodeA",)
    nan = Fault(
        FaultKind.ANOMALY,
        0,
        12,
        1.0,
        "nan",
        anomaly="nan",
        suggested="rollback",
        rollback_to=11,
        skip_batches=(12,),
    )
    d = decide(nan, History(0), cfg)
    assert d.action is Action.ROLLBACK and d.rollback_to == 11 and d.skip_batches == (12,)
    # NaN rollbacks are budgeted apart from the other restarts (issue: long runs)
    assert decide(nan, History(rollback_streak=cfg.max_rollbacks), cfg).action is Action.GIVE_UP
    assert decide(nan, History(streak=cfg.max_restarts), cfg).action is Action.ROLLBACK


def test_judge_each_kind_of_event():
    xid_on_rank, xid_idle, nan, spike, straggler, restart = (
        judge(e, PLACEMENT, DATA, 11, 7.0) for e in EVENTS
    )
    assert (
        xid_on_rank.decision == "cordon"
        and xid_on_rank.fault.rank == 0
        and xid_on_rank.cordon is None
    )
    assert xid_on_rank.fault.node == "nA" and xid_on_rank.fault.detected_at == 7.0
    assert (
        xid_idle.decision == "cordon_only" and xid_idle.fault is None and xid_idle.cordon[0] == "nC"
    )
    assert (nan.fault.rollback_to, nan.fault.skip_batches, nan.fault.step) == (11, (12,), 12)
    assert (spike.fault.rollback_to, spike.fault.skip_batches) == (17, (19, 20, 21))
    assert straggler.decision == "warn" and straggler.fault is None and straggler.cordon is None
    assert (
        restart.fault.rank == 1 and restart.fault.step == 12
    )  # no step in the event: the next one
    assert decide(restart.fault, History(0), SupervisorConfig()).action is Action.RESTART
    assert policy.describe(xid_on_rank.fault) == "gpu_xid of rank 0 at step 12"


def test_restore_plan_never_takes_a_storage_error_for_no_checkpoint():
    from resilient.supervisor.policy import restore_plan

    assert restore_plan(None, None, None) == "restore"  # nothing persisted: a true fresh start
    assert restore_plan(40, None, 30) == "restore"
    assert restore_plan(None, "down", 30) == "wait"
    assert restore_plan(20, "down", 30) == "wait"  # memory is older than what storage holds
    assert restore_plan(35, "down", 30) == "restore"  # memory is fresher: storage not needed
    assert restore_plan(None, None, 30) == "refuse"  # storage answers without it
    assert restore_plan(20, None, 30) == "refuse"  # nor an older copy in its place
    # read whole and known bad everywhere: nothing can bring it back, so the job goes on
    assert restore_plan(None, None, 30, damaged={30}) == "restore"
    assert restore_plan(20, None, 30, damaged={30}) == "restore"
    assert restore_plan(None, None, 30, damaged={20}) == "refuse"  # the newest one is not damaged
    assert restore_plan(None, "down", 30, damaged={30}) == "restore"  # no wait brings it back


def test_each_give_up_names_its_rule():
    cfg = SupervisorConfig(max_restarts=3, max_restarts_per_hour=10, progress_steps=10)
    assert decide(FAULT, History(streak=2, last_hour=9), cfg).action is Action.RESTART
    burst = decide(FAULT, History(streak=3), cfg)
    assert burst.action is Action.GIVE_UP and "3 faults in a row" in burst.reason
    assert "supervisor.max_restarts=3" in burst.reason and "progress_steps=10" in burst.reason
    rate = decide(FAULT, History(streak=0, last_hour=10), cfg)
    assert rate.action is Action.GIVE_UP and "max_restarts_per_hour=10" in rate.reason


def test_faults_far_apart_never_add_up():
    from resilient.supervisor.budget import Budget

    cfg = SupervisorConfig()  # max_restarts 5, progress_steps 10
    b = Budget(cfg, [])
    for i in range(50):  # 50 faults, each 100 steps after the last restore
        h = b.history(progress=100, stopping=False, now=1000.0 * i)
        assert decide(FAULT, h, cfg).action is Action.RESTART
        b.restarted(FAULT, now=1000.0 * i)
    # then a burst without progress: with the last far one, that is 5 restarts in a row, and the
    # fault after them gives up
    for i in range(4):
        h = b.history(progress=2, stopping=False, now=60_000.0 + i)
        assert decide(FAULT, h, cfg).action is Action.RESTART
        b.restarted(FAULT, now=60_000.0 + i)
    assert decide(FAULT, b.history(2, False, 60_010.0), cfg).action is Action.GIVE_UP
    again = Budget(cfg, [{"type": "restart", "t": 60_004.0, "streak": 5, "rollback_streak": 0}])
    assert decide(FAULT, again.history(2, False, 60_010.0), cfg).action is Action.GIVE_UP


def _xid(node: str, rank: int | None = 1) -> Fault:
    return Fault(
        FaultKind.ANOMALY, rank, 8, 1.0, "xid 79", node=node, anomaly="gpu_xid", suggested="cordon"
    )


def test_one_poll_acts_on_one_fault_and_cordons_every_failed_gpus_node():
    """A poll can bring a death and XIDs: one restart, on none of the failed GPUs' nodes."""
    death = Fault(FaultKind.CRASH, 0, 8, 1.0, "gone", node="node0")
    nan = Fault(
        FaultKind.ANOMALY, 0, 8, 1.0, "nan", node="node0", anomaly="nan", suggested="rollback"
    )
    assert acted_on([]) is None and acted_on([nan, _xid("node1")]) == nan
    assert acted_on([_xid("node1")], death) == death  # another node's XID does not explain it
    assert acted_on([_xid("node1"), _xid("node0", 0)], death) == _xid("node0", 0)  # its own does
    lost = replace(death, kind=FaultKind.NODE_LOSS)
    assert acted_on([_xid("node0", 0)], lost) == lost  # the whole node is gone: that is why
    poll = [_xid("node1"), _xid("node2", 2), _xid("node1", 3), nan]
    assert list(also_cordon(death, poll)) == ["node1", "node2"]
    assert "crash of rank 0 at step 8" in also_cordon(death, poll)["node1"]
    assert list(also_cordon(_xid("node1"), poll)) == ["node2"]  # its own node is decide()'s
    assert also_cordon(death, [nan]) == {}  # a NaN is not a node's fault
    # the death's restart keeps no survivor on a node cordoned meanwhile: the whole group restarts
    cfg = SupervisorConfig()
    assert decide(death, History(0), cfg).keep_survivors
    assert not decide(death, History(0, on_cordoned=True), cfg).keep_survivors
