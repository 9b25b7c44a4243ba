"""The failure policy: a pure function from a fault and the job's history to a decision.

Contract: `decide(fault, restarts_so_far, cfg)` looks at nothing else and changes nothing. Crashes,
hangs and errors restart the group; an anomaly restarts it the way its detector suggests (cordon the
node, roll back before the anomaly and skip its batches, or plain restart). The first
restart is immediate (a lost step costs more than a lost second); later ones back off exponentially
from `backoff_base` up to `backoff_max`; once `max_restarts` restarts are spent the job gives up with
a reason a person can act on.
"""
from __future__ import annotations

from resilient.config import SupervisorConfig
from resilient.anomaly.events import CORDON, ROLLBACK
from resilient.supervisor.faults import Action, Decision, Fault, FaultKind


def backoff(restarts_so_far: int, cfg: SupervisorConfig) -> float:
    """Delay before restart number `restarts_so_far + 1`."""
    if restarts_so_far == 0:
        return 0.0
    return min(cfg.backoff_max, cfg.backoff_base * 2 ** (restarts_so_far - 1))


def describe(fault: Fault) -> str:
    where = (f"rank {fault.rank}" if fault.rank is not None else
             f"node {fault.node[:12]}" if fault.node else "the worker group")
    kind = fault.anomaly or fault.kind.value
    return f"{kind} of {where} at step {fault.step}"


def decide(fault: Fault, restarts_so_far: int, cfg: SupervisorConfig) -> Decision:
    if restarts_so_far >= cfg.max_restarts:
        return Decision(Action.GIVE_UP, (
            f"restart budget spent: {restarts_so_far} of supervisor.max_restarts={cfg.max_restarts} used; "
            f"last fault: {describe(fault)} ({fault.evidence.splitlines()[0] if fault.evidence else 'no evidence'}). "
            "Fix the cause shown in the journal, or raise supervisor.max_restarts, then "
            "`resilient launch --resume RUN_DIR`"))
    delay = backoff(restarts_so_far, cfg)
    if fault.kind == FaultKind.ANOMALY and fault.suggested == CORDON and fault.node:
        return Decision(Action.CORDON, f"{describe(fault)}: cordon node {fault.node[:12]} and restart without it",
                        delay_s=delay, exclude_nodes=(fault.node,))
    if fault.kind == FaultKind.ANOMALY and fault.suggested == ROLLBACK:
        return Decision(Action.ROLLBACK, f"{describe(fault)}: roll back to step <= {fault.rollback_to} and skip "
                        f"data batches {list(fault.skip_batches)}", delay_s=delay, rollback_to=fault.rollback_to,
                        skip_batches=fault.skip_batches)
    return Decision(Action.RESTART, f"{describe(fault)}: restart the worker group from the newest checkpoint",
                    delay_s=delay)
