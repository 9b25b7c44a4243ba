"""Elastic sizing: how many ranks the next worker group gets, and which ranks a fault replaces.

Contract: pure functions of their arguments (no clock, no I/O).
- `size(capacity, target, least, waited_s, wait_s)`: the world size of the next group. The job runs
  on as many ranks as fit, up to `target` (`cluster.num_workers`, or what `resilient scale` asked
  for), if that is at least `least` (`cluster.min_workers`); with fewer it waits up to `wait_s`
  (`supervisor.capacity_wait_s`) for capacity, then fails with a reason a person can act on.
- `wants_resize(world, target, capacity, least)`: while a group runs, whether to pause it at the
  next step and re-form it: growing when more ranks fit (up to `target`), shrinking when `target`
  was lowered.
- `keeps_survivors(fault)`: whether a fault replaces only its rank (and any dead one), the other
  ranks keeping their processes and their models (crashes, errors, silent ranks and stragglers);
  other anomalies restart the group (a cordon or a rollback changes more than one rank).
"""

from __future__ import annotations

from dataclasses import dataclass

from resilient.supervisor.faults import Fault, FaultKind

RUN, WAIT, FAIL = "run", "wait", "fail"
KEEPS_SURVIVORS = frozenset(
    {FaultKind.CRASH, FaultKind.ERROR, FaultKind.HANG, FaultKind.NODE_LOSS, FaultKind.PARTITION}
)


@dataclass(frozen=True)
class Sizing:
    action: str  # RUN (with `world`), WAIT (for capacity) or FAIL
    world: int | None
    reason: str


def size(capacity: int, target: int, least: int, waited_s: float, wait_s: float) -> Sizing:
    if capacity >= least:
        world = min(target, capacity)
        why = (
            f"{world} of {target} ranks fit the healthy nodes"
            if world < target
            else f"{world} rank(s)"
        )
        return Sizing(RUN, world, why)
    short = (
        f"the healthy nodes hold {capacity} rank(s), fewer than the {least} the job needs "
        f"(cluster.min_workers, default cluster.num_workers)"
    )
    if waited_s < wait_s:
        return Sizing(WAIT, None, f"{short}: waiting up to supervisor.capacity_wait_s={wait_s:g}s")
    return Sizing(
        FAIL,
        None,
        f"{short}, after waiting supervisor.capacity_wait_s={wait_s:g}s; add nodes or lower "
        "cluster.min_workers, then `resilient launch --resume RUN_DIR`",
    )


def wants_resize(world: int, target: int, capacity: int, least: int) -> int | None:
    """The world size to re-form a running group at, or None to go on as it is."""
    want = max(least, min(target, capacity))
    if want > world or (target < world and want < world):
        return want
    return None


def keeps_survivors(fault: Fault) -> bool:
    replace_one = fault.kind == FaultKind.ANOMALY and fault.suggested == "replace"
    return (fault.kind in KEEPS_SURVIVORS or replace_one) and fault.rank is not None
