"""The failure policy: pure functions from what happened to what to do.

Contract: every function here looks at its arguments only (no clock, no I/O) and changes nothing.
- `judge(event, placement, data_steps, step, now)`: what an anomaly event means. Warnings are
  journalled and training goes on; a node to cordon where no rank runs is cordoned without a
  restart; anything else becomes a Fault: NaN/Inf rolls back to the step before it and skips its
  data batch, a loss spike (after `anomaly.spike_patience`) rolls back before the first spike and
  skips every spiked batch, hardware faults cordon their node, the rest restart.
- `decide(fault, history, cfg)`: a crash, hang or error of a rank replaces that rank, the others
  keeping their processes (`elastic.keeps_survivors`), and so does a straggler (unless its node's
  ranks straggled before: then the node is cordoned); a lost or partitioned node is cordoned and
  its ranks replaced, the ranks elsewhere kept; a hang of no rank restarts the group; silent
  corruption (`sdc`) rolls back to the newest step that agreed, replacing the diverged rank while
  the others keep their processes, or cordoning a node whose work did not reproduce (or whose
  replica diverged before) and restarting the group; an anomaly restarts it the way `judge` said
  (cordon the node, roll back and skip, or plain restart). The first
  restart of a run of faults is immediate (a lost step costs more than a lost second); later ones
  back off exponentially from `backoff_base` up to `backoff_max`. The job gives up, naming the rule
  that fired, at once when every rank failed the same way before training (not an outage), when
  faults recur without progress (`max_restarts` in a row, each within
  `progress_steps` steps of the last; NaN/spike rollbacks budgeted apart by `max_rollbacks`), past
  `max_restarts_per_hour`, or when a fault strikes while it stops (after a stop *signal* it ends
  the job STOPPED instead: the signal is the likely cause). Faults far apart never add up: a
  two-week job meets far more than `max_restarts` of them. No survivor is kept on a node cordoned
  since the group started (`History.on_cordoned`).
- `acted_on(poll, death)`: the one fault of a poll to act on (after a death, a fault on the dead
  rank's node explains it); `also_cordon(fault, poll)`: the other nodes the poll's faults cordon
  with it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from resilient.anomaly.events import CORDON, REPLACE, ROLLBACK, WARN, AnomalyEvent
from resilient.config import SupervisorConfig
from resilient.supervisor.elastic import keeps_survivors
from resilient.supervisor.faults import (
    NODE_FAULTS,
    Action,
    Decision,
    Fault,
    FaultKind,
    History,
    Verdict,
)

RESUME_HINT = "`resilient launch --resume RUN_DIR`"


def backoff(restarts_so_far: int, cfg: SupervisorConfig) -> float:
    """Delay before restart number `restarts_so_far + 1` of a run of faults."""
    if restarts_so_far == 0:
        return 0.0
    return min(cfg.backoff_max, cfg.backoff_base * 2 ** (restarts_so_far - 1))


def describe(fault: Fault) -> str:
    if fault.rank is not None:
        where = f"rank {fault.rank}"
    else:
        where = f"node {fault.node[:12]}" if fault.node else "the worker group"
    return f"{fault.anomaly or fault.kind.value} of {where} at step {fault.step}"


def _first_line(fault: Fault) -> str:
    return fault.evidence.splitlines()[0] if fault.evidence else "no evidence"


def _budget_spent(fault: Fault, h: History, cfg: SupervisorConfig) -> str | None:
    """Which give-up rule fires, in words a person can act on (None: none does)."""
    last = f"last fault: {describe(fault)} ({_first_line(fault)})"
    if is_rollback(fault) and h.rollback_streak >= cfg.max_rollbacks:
        return (
            f"rollback budget spent: {h.rollback_streak} rollbacks in a row, each within "
            f"supervisor.progress_steps={cfg.progress_steps} steps of the last "
            f"(supervisor.max_rollbacks={cfg.max_rollbacks}); {last}. The data or the "
            f"learning rate keeps producing NaN/spikes: fix it, or raise "
            f"supervisor.max_rollbacks, then {RESUME_HINT}"
        )
    if not is_rollback(fault) and h.streak >= cfg.max_restarts:
        return (
            f"restart budget spent: {h.streak} faults in a row, each within "
            f"supervisor.progress_steps={cfg.progress_steps} steps of the last "
            f"(supervisor.max_restarts={cfg.max_restarts}); {last}. Fix the cause shown in "
            f"the journal, or raise supervisor.max_restarts, then {RESUME_HINT}"
        )
    if cfg.max_restarts_per_hour and h.last_hour >= cfg.max_restarts_per_hour:
        return (
            f"restart rate exceeded: {h.last_hour} restarts within the last hour "
            f"(supervisor.max_restarts_per_hour={cfg.max_restarts_per_hour}); {last}. Fix "
            f"the cause, or raise the limit, then {RESUME_HINT}"
        )
    return None


TRANSIENT = ("Timeout", "timed out", "ConnectionError", "Connection refused", "Connection reset",
             "ServiceUnavailable", "503", "SlowDown", "Throttl")  # fmt: skip


def _deterministic(fault: Fault) -> str | None:
    """Every rank failed the same way before training started, with no sign of a passing outage
    (a credential, a missing file, a bug): a restart meets it again, so say it now."""
    first = _first_line(fault)
    if fault.kind != FaultKind.ERROR or not fault.everywhere or any(t in first for t in TRANSIENT):
        return None
    return (
        f"every rank failed the same way before training started: {first}. A restart would "
        f"fail again: fix the cause (e.g. storage credentials on every node), then {RESUME_HINT}"
    )


def is_rollback(fault: Fault) -> bool:
    """NaN/spike faults: budgeted apart from the other restarts."""
    return fault.kind == FaultKind.ANOMALY and fault.suggested == ROLLBACK


def acted_on(poll: Sequence[Fault], death: Fault | None = None) -> Fault | None:
    """The fault of one poll to act on: after a rank's `death`, a fault on the dead rank's node
    (a GPU's XID comes with the death of the process that used it: the node is why), else the
    death; without one, the poll's first fault (None: training goes on)."""
    if death is None:
        return poll[0] if poll else None
    mine = death.node if death.kind == FaultKind.CRASH else None
    return next((f for f in poll if mine and f.node == mine), death)


def also_cordon(fault: Fault, others: Sequence[Fault]) -> dict[str, str]:
    """Node -> reason: the nodes to cordon besides what is decided for `fault`, the one acted
    on: another node's fault of the same poll that alone would have cordoned it (a GPU's XID is
    not raised again until the GPU is used, so the restart would put a rank back on it)."""
    nodes: dict[str, str] = {}
    for f in others:
        if (
            f.kind == FaultKind.ANOMALY
            and f.suggested == CORDON
            and f.node not in (None, fault.node)
        ):
            reason = (
                f"{describe(f)}, with the {describe(fault)} acted on: cordon node {f.node[:12]}"
            )
            nodes.setdefault(f.node, reason)
    return nodes


def decide(fault: Fault, history: History, cfg: SupervisorConfig) -> Decision:
    if history.stopping and history.stop_signal:
        # The same signal can end a Ray cluster the user started beside the launch (an embedded
        # one does not hear it), and the ranks with it: the end asked for came first, that is all.
        return Decision(
            Action.STOP,
            f"stopped on {history.stop_signal}, which the job did not outlive: "
            f"{describe(fault)} while stopping ({_first_line(fault)})",
        )
    if history.stopping:
        return Decision(
            Action.GIVE_UP,
            (
                f"{describe(fault)} while stopping ({_first_line(fault)}): the stop could not "
                f"complete; the newest persisted checkpoint is kept, {RESUME_HINT} goes on from it"
            ),
        )
    spent = _budget_spent(fault, history, cfg) or _deterministic(fault)
    if spent:
        return Decision(Action.GIVE_UP, spent)
    delay = backoff(history.rollback_streak if is_rollback(fault) else history.streak, cfg)
    keep = cfg.keep_survivors and not history.on_cordoned  # survivors, where the fault allows
    if fault.kind == FaultKind.ANOMALY and fault.suggested == CORDON and fault.node:
        return Decision(
            Action.CORDON,
            f"{describe(fault)}: cordon node {fault.node[:12]} and restart without it",
            delay_s=delay,
            exclude_nodes=(fault.node,),
        )
    if fault.kind in NODE_FAULTS and fault.node:
        return _node_decision(fault, keep, delay)
    if fault.kind == FaultKind.SDC:
        return _sdc_decision(fault, history, delay, keep)
    repeated = history.node_offences >= 1 and fault.node and history.other_nodes > 0
    if fault.suggested == REPLACE and repeated:
        return Decision(
            Action.CORDON,
            f"{describe(fault)}: the ranks of node {fault.node[:12]} straggled "
            f"{history.node_offences + 1} times: cordon it and restart without it",
            delay_s=delay,
            exclude_nodes=(fault.node,),
        )
    if is_rollback(fault):
        return Decision(
            Action.ROLLBACK,
            f"{describe(fault)}: roll back to step <= "
            f"{fault.rollback_to} and skip data batches {list(fault.skip_batches)}",
            delay_s=delay,
            rollback_to=fault.rollback_to,
            skip_batches=fault.skip_batches,
        )
    if keep and keeps_survivors(fault):
        return Decision(
            Action.RESTART,
            f"{describe(fault)}: replace rank {fault.rank}, the other ranks keep their processes "
            "and go on from the newest checkpoint",
            delay_s=delay,
            keep_survivors=True,
        )
    return Decision(
        Action.RESTART,
        f"{describe(fault)}: restart the worker group from the newest checkpoint",
        delay_s=delay,
    )


def _sdc_decision(fault: Fault, history: History, delay: float, keep_survivors: bool) -> Decision:
    """Silent corruption: roll back to the newest step whose replicas agreed (and passed their
    audit). A node whose work did not reproduce (`suggested` cordon) is cordoned at once and the
    group restarted without it; a rank whose replica diverged is replaced, the others keeping their
    processes (each loads the agreed step: the rollback costs a restore, not a cold start), and its
    node is cordoned on a second offence, where other nodes remain (then the group restarts)."""
    node = fault.node
    # a replica that diverged again is its node's second offence; cordoned where the job can go
    # on elsewhere (one machine: replaced again, the job goes on)
    again = history.node_offences >= 1 and history.other_nodes > 0
    cordon = bool(node) and (fault.suggested == CORDON or again)
    keep = keep_survivors and not cordon and fault.rank is not None
    why = f"{describe(fault)}: roll back to step <= {fault.rollback_to}, the newest that agreed"
    if cordon:
        why += f"; cordon node {node[:12]}" + (
            f" (offence {history.node_offences + 1})" if fault.suggested != CORDON else ""
        )
    return Decision(
        Action.ROLLBACK,
        why
        + (
            f"; replace rank {fault.rank}, the other ranks keep their processes and load that step"
            if keep
            else " and restart the ranks from there"
        ),
        delay_s=delay,
        exclude_nodes=(node,) if cordon else (),
        rollback_to=fault.rollback_to,
        keep_survivors=keep,
    )


def _node_decision(fault: Fault, keep_survivors: bool, delay: float) -> Decision:
    """A lost or unreachable node: never placed on again in this run (cordoned), its ranks
    replaced; the ranks on other nodes keep their processes (unless keep_survivors is off)."""
    what = "lost" if fault.kind == FaultKind.NODE_LOSS else "unreachable (partitioned)"
    keep = keep_survivors and keeps_survivors(fault)
    return Decision(
        Action.RESTART,
        f"{describe(fault)}: node {fault.node[:12]} is {what}: cordon it for the rest of the run "
        + (
            "and replace its ranks; the ranks on other nodes keep their processes"
            if keep
            else "and restart the worker group without it"
        ),
        delay_s=delay,
        exclude_nodes=(fault.node,),
        keep_survivors=keep,
    )


def restore_plan(
    found: int | None,
    storage_error: str | None,
    persisted: int | None,
    damaged: Collection[int] = (),
) -> str:
    """What to do with the freshest copy found (its step, or None) when the journal says the
    newest persisted checkpoint that may be restored is `persisted`: "restore" it (None: a fresh
    start), "wait" (storage could not be read and nothing found is as fresh: a storage error is
    never "no checkpoint"), or "refuse" (storage answers without the persisted checkpoint: it may
    sit in another place, so never go back further). A persisted checkpoint in `damaged` was read
    and is known bad in every copy: nothing can bring it back, so the job goes on from the newest
    older copy, or over from step 0, and says so."""
    short = (
        persisted is not None and persisted not in damaged and (found is None or found < persisted)
    )
    if short:
        return "wait" if storage_error else "refuse"
    return "restore"


def rollback_point(
    e: AnomalyEvent, at: int, data_steps: Mapping[int, Collection[int]]
) -> tuple[int | None, tuple[int, ...]]:
    """(the newest step known good, the data batches to skip) for a numerics event at step `at`;
    `data_steps[step]` are the data steps the ranks trained on at `step`."""
    if e.kind == "nan":
        return at - 1, tuple(sorted(data_steps.get(at, ())))
    if e.kind == "loss_spike":
        spikes = e.evidence.get("spike_steps", [at])
        return min(spikes) - 1, tuple(d for s in spikes for d in sorted(data_steps.get(s, ())))
    return None, ()


def judge(
    e: AnomalyEvent,
    placement: Sequence[str],
    data_steps: Mapping[int, Collection[int]],
    step: int,
    now: float,
) -> Verdict:
    """What event `e` means for a group placed as `placement` (rank -> node) whose last finished
    step is `step`; `now` stamps the fault."""
    on_node = [r for r, n in enumerate(placement) if e.node and n == e.node]
    if e.action == CORDON and e.node and not on_node:
        reason = f"{e.kind}: {e.evidence.get('reason', '')} (no rank there: no restart)"
        return Verdict("cordon_only", cordon=(e.node, reason))
    if e.action == WARN:
        return Verdict(WARN)
    rank = e.rank if e.rank is not None else (on_node[0] if on_node else None)
    node = e.node
    if node is None and e.action == REPLACE and rank is not None and rank < len(placement):
        node = placement[rank]  # a straggler's node: a second offence there cordons it
    at = e.step or step + 1
    rollback_to, skip = rollback_point(e, at, data_steps)
    fault = Fault(
        FaultKind.ANOMALY,
        rank,
        at,
        now,
        f"{e.kind}: {e.evidence}"[:500],
        node=node,
        anomaly=e.kind,
        suggested=e.action,
        rollback_to=rollback_to,
        skip_batches=skip,
    )
    return Verdict(e.action, fault=fault)
