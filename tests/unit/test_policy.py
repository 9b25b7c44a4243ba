import pytest

from resilient.config import SupervisorConfig
from resilient.supervisor.faults import Action, Fault, FaultKind
from resilient.supervisor.policy import backoff, decide

pytestmark = pytest.mark.timeout(10)
FAULT = Fault(FaultKind.CRASH, 1, 14, 100.0, "actor died")


def test_restart_within_budget():
    cfg = SupervisorConfig(max_restarts=3)
    d = decide(FAULT, 0, cfg)
    assert d.action is Action.RESTART and d.delay_s == 0.0
    assert "rank 1" in d.reason


def test_backoff_grows_and_is_capped():
    cfg = SupervisorConfig(max_restarts=10, backoff_base=1.0, backoff_max=5.0)
    assert [backoff(n, cfg) for n in range(6)] == [0.0, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert decide(FAULT, 3, cfg).delay_s == 4.0


def test_gives_up_with_a_reason_when_budget_spent():
    cfg = SupervisorConfig(max_restarts=2)
    d = decide(FAULT, 2, cfg)
    assert d.action is Action.GIVE_UP
    assert "max_restarts=2" in d.reason and "crash of rank 1 at step 14" in d.reason


def test_policy_is_pure():
    cfg = SupervisorConfig()
    assert decide(FAULT, 1, cfg) == decide(FAULT, 1, cfg)


def test_anomalies_map_to_cordon_and_rollback():
    cfg = SupervisorConfig()
    xid = Fault(FaultKind.ANOMALY, 1, 12, 1.0, "gpu_xid", node="nodeA", anomaly="gpu_xid", suggested="cordon")
    d = decide(xid, 0, cfg)
    assert d.action is Action.CORDON and d.exclude_nodes == ("nodeA",)
    nan = Fault(FaultKind.ANOMALY, 0, 12, 1.0, "nan", anomaly="nan", suggested="rollback", rollback_to=11,
                skip_batches=(12,))
    d = decide(nan, 0, cfg)
    assert d.action is Action.ROLLBACK and d.rollback_to == 11 and d.skip_batches == (12,)
    assert decide(nan, cfg.max_restarts, cfg).action is Action.GIVE_UP
