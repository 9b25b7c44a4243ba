"""Finding the state a new worker group restores: the freshest verified copy, and never a silent
start from scratch.

Contract: `find_restore_point(...)` drops the agents of lost nodes, looks the freshest verified copy
up over memory, peer and storage (`Nodes.restore_source`) and applies `policy.restore_plan` with the
newest persisted step the journal knows: it returns the source to restore (None: a true fresh
start), keeps looking every `RETRY_S` while storage cannot be read and nothing found is as fresh
(journalled once as `restore_wait`, shown through `on_wait`), and raises `RestoreImpossible` with
a reason a person can act on when the wait passes `timeout` or when storage answers without the
checkpoints the journal says it holds. A persisted checkpoint whose every copy was read and failed
verification is known lost: the group goes on from the newest older copy (or from step 0), logged
as a warning and journalled with `lost_steps`. `exclude`: persisted steps a rollback abandoned.
`abandon_after(...)`: after a rollback, drops the abandoned timeline's states. Every lookup that
found or skipped something is journalled as `restore`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from resilient.checkpoint.source import Lookup, RestoreSource
from resilient.supervisor import policy

RETRY_S = 2.0
log = logging.getLogger(__name__)


class RestoreImpossible(Exception):
    """No state can be restored and starting over would lose persisted work: the reason."""


def find_restore_point(
    nodes,
    store,
    fingerprint: str,
    at_most: int | None,
    persisted: int | None,
    journal,
    timeout: float,
    on_wait: Callable[[str], None] = lambda note: None,
    exclude: frozenset[int] = frozenset(),
) -> RestoreSource | None:
    deadline, waiting = time.time() + timeout, False
    while True:
        gone = nodes.prune_dead()
        if gone:
            journal.append("nodes_lost", nodes=gone)
        t0 = time.time()
        found = nodes.restore_source(store, fingerprint, at_most, exclude)
        source = found.source
        plan = policy.restore_plan(
            source.step if source else None, found.storage_error, persisted, found.damaged
        )
        if plan == "restore":
            _journal_restore(journal, found, persisted, time.time() - t0)
            return source
        if plan == "refuse":
            raise RestoreImpossible(
                f"the journal records a persisted checkpoint of step {persisted} but none "
                f"verifies ({'; '.join(found.skipped) or 'storage holds none'}): refusing to "
                "start over; restore the checkpoints into the run directory, then "
                "`resilient launch --resume RUN_DIR`"
            )
        note = f"storage unreachable ({found.storage_error}); waiting to restore step {persisted}"
        if not waiting:
            waiting = True
            journal.append("restore_wait", error=found.storage_error, persisted=persisted)
        on_wait(note)
        if time.time() > deadline:
            raise RestoreImpossible(
                f"storage could not be read for supervisor.start_timeout={timeout:g}s "
                f"({found.storage_error}); its checkpoints are kept: `resilient launch --resume "
                "RUN_DIR` once it answers"
            )
        time.sleep(RETRY_S)


def _journal_restore(journal, found: Lookup, persisted: int | None, lookup_s: float) -> None:
    """Journal what a lookup found and skipped; a persisted checkpoint given up is said loudly."""
    source = found.source
    step = source.step if source else 0
    lost = persisted - step if persisted is not None and step < persisted else 0
    if lost:  # every copy of the newest persisted checkpoint is known bad
        log.warning(
            "every copy of step %d fails verification (%s): going on from step %d",
            persisted,
            "; ".join(found.skipped),
            step,
        )
    if source or found.skipped:
        journal.append(
            "restore",
            step=step,
            tier=source.tier if source else "none",
            node=source.node if source else None,
            skipped=found.skipped,
            lookup_s=round(lookup_s, 4),
            **({"lost_steps": lost} if lost else {}),
        )


def abandon_after(restored: int, nodes, intake, store, journal, rollback: dict) -> None:
    """A rollback to `restored` leaves a timeline: its states after that step (in the agents'
    memory, in storage) are never restored again. The agents drop theirs first (an upload under
    way is undone by its persister). The `rollback` record (`rollback`'s fields, and the
    `abandoned` persisted steps: the journal's and the listing's) is written before anything is
    deleted, so a supervisor that dies midway still knows them; then they are deleted (an earlier
    rollback's leftovers too), journalled as `discarded`. Any an outage keeps stay excluded
    through `intake.abandoned`, which those records rebuild on a resume."""
    nodes.forget_after(restored)
    try:  # committed but not yet reported: the listing knows
        listed = {s for s in store.steps() if s > restored}
    except Exception:  # an outage: the journal's view (a later rollback lists again)
        listed = set()
    known = {s for s in intake.persisted if s > restored}
    intake.learn(
        [journal.append("rollback", to_step=restored, abandoned=sorted(known | listed), **rollback)]
    )
    deleted = []
    for step in sorted(s for s in intake.abandoned if s > restored):
        try:
            store.discard(step)
        except Exception as e:  # excluded from restores; deleted on a later rollback
            log.warning("could not delete abandoned checkpoint of step %d: %s", step, e)
            continue
        deleted.append(step)
    if deleted:
        intake.learn([journal.append("discarded", steps=deleted, after_rollback_to=restored)])
