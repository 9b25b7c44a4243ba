"""Sizing: how many ranks each attempt has, resizes while training, and a group re-formed around
its survivors. One collaborator of the supervisor with its own state (the world size, the kept
group, why the next attempt may have another size); it changes the job's state only through the
run's book (`RunBook.to`) and journals every decision before acting; the decisions are
`elastic`'s pure functions.

- `size()` (before each attempt): how many ranks fit the healthy nodes (`Nodes.capacity`), up to
  the target (`cluster.num_workers`, or `resilient scale`), at least `cluster.min_workers`; waits
  in RESIZING up to `supervisor.capacity_wait_s` when fewer fit, then fails. A change of size is
  journalled as a `resize` record (`step`, `from`, `to`, `reason`).
- `check_size(group)` (while training, every `SIZE_CHECK_S`): pauses the group at the next step
  when it should grow (capacity came back) or shrink (`resilient scale` asked for fewer).
- `keep(group, fault)` (a fault whose policy keeps survivors): replaces the fault's rank (every
  rank on its node, for a lost node) and any dead one, has the others leave the broken process
  group (replacing, and journalling why, any that cannot), and keeps the group for the next
  attempt; `group_for(placement)` gives the next attempt that group, or a new one.
"""

from __future__ import annotations

import time

from resilient.config import JobSpec
from resilient.runlog.states import JobState
from resilient.supervisor import elastic
from resilient.supervisor.book import RunBook
from resilient.supervisor.faults import NODE_FAULTS
from resilient.supervisor.fleet import Fleet
from resilient.supervisor.parts import Parts

SIZE_CHECK_S = 2.0  # how often a running job asks whether it can grow (one GCS call)
CAPACITY_POLL_S = 1.0  # how often a job waiting for capacity looks again
LEAVE_TIMEOUT_S = 10.0  # how long survivors get to leave a broken collective (a dead peer: <1 s)
# after a node loss or partition: a peer on a cut-off node never answers, so a survivor blocked on
# it is replaced at once rather than waited for (a dead node's peers fail within a second)
NODE_LEAVE_TIMEOUT_S = 2.0
GROW_PLACE_S = 30.0  # how long a grow waits for Ray to place the larger group
GROW_BACKOFF_S = 300.0  # after a grow Ray could not place, the next try waits this much longer


class Sizing:
    def __init__(self, spec: JobSpec, book: RunBook, fleet: Fleet, parts: Parts):
        self.spec, self.book, self.fleet, self.journal = spec, book, fleet, book.journal
        self.nodes, self.control, self.clock = parts.nodes, parts.control, parts.clock
        self.new_group = parts.new_group
        self.world = spec.cluster.num_workers  # ranks of the current (or next) group
        self.kept = None  # a group whose survivors go on in the next attempt
        self._kept_generation = 0
        self._last_size_check = 0.0
        self.resize_cause: str | None = None  # why the next attempt may have another size

    def target(self) -> int:
        """`cluster.num_workers`, or what `resilient scale` asked for (within min..num)."""
        c = self.spec.cluster
        asked = getattr(self.control, "scale_to", None)
        return max(c.least, min(c.num_workers, asked)) if asked else c.num_workers

    def size(self) -> int | None:
        """The next group's world size (a change journalled); None when the job ended waiting."""
        c, cfg = self.spec.cluster, self.spec.supervisor
        since = self.clock()
        while True:
            waited = self.clock() - since
            s = elastic.size(
                self.nodes.capacity(self.fleet.excluded()),
                self.target(),
                c.least,
                waited,
                cfg.capacity_wait_s,
            )
            if s.action == elastic.FAIL:
                self.book.to(JobState.FAILED, s.reason)
                return None
            if s.action == elastic.RUN:
                break
            if self.book.state != JobState.RESIZING:
                self.book.to(JobState.RESIZING, s.reason)
            if self.control.stop_reason:
                self._stop_waiting()
                return None
            self.book.check_grace()
            self.book.emit(note=s.reason)
            self._pause_for(CAPACITY_POLL_S)
        if s.world != self.world:
            reason = f"{self._cause(s.world)}: {s.reason}"
            self.journal.append(
                "resize",
                step=self.book.restored,
                **{"from": self.world, "to": s.world},
                reason=reason,
            )
            if self.book.state != JobState.RESIZING:
                self.book.to(JobState.RESIZING, reason)
            self.world = s.world
        self.resize_cause = None
        if self.book.state == JobState.RESIZING:
            self.book.to(JobState.STARTING, f"{s.world} rank(s)")
        return s.world

    def _cause(self, world: int) -> str:
        """Why the next group has `world` ranks: what paused the last one, or a `resilient scale`
        request this size meets (one that came before the group ran: nothing paused for it), or
        the cluster's capacity."""
        if self.resize_cause:
            return self.resize_cause
        asked = getattr(self.control, "scale_to", None)
        if asked is not None and world == self.target():
            return f"resilient scale asked for {asked} rank(s)"
        return "capacity"

    def _stop_waiting(self) -> None:
        self.book.stop_reason = self.control.stop_reason
        self.book.to(JobState.STOPPING, f"stop requested: {self.book.stop_reason}")
        self.book.to(
            JobState.STOPPED,
            f"stopped at step {self.book.step} while waiting for capacity; the newest persisted "
            "checkpoint is kept: `resilient launch --resume RUN_DIR` goes on from it",
        )

    def _pause_for(self, seconds: float) -> None:
        """Sleep, or move a fake clock (tests) that only moves when told to."""
        advance = getattr(self.clock, "advance", None)
        advance(seconds) if advance else time.sleep(seconds)

    def check_size(self, group) -> None:
        """Pause a running group at the next step when it should have another size."""
        if self.book.state != JobState.RUNNING or self.resize_cause:
            return
        target = self.target()
        if self.world == target:
            return  # the size wanted: no need to ask the cluster
        if target > self.world:  # growing needs capacity: ask the cluster, not every tick
            now = self.clock()
            if now - self._last_size_check < SIZE_CHECK_S:
                return
            self._last_size_check = now
        capacity = self.nodes.capacity(self.fleet.excluded()) if target > self.world else self.world
        want = elastic.wants_resize(self.world, target, capacity, self.spec.cluster.least)
        if want is not None:
            asked = getattr(self.control, "scale_to", None)
            self.resize_cause = (
                f"resilient scale asked for {target} rank(s)"
                if asked is not None and asked == target
                else f"capacity for {want} rank(s) returned"
            )
            group.request_pause()

    def paused(self) -> None:
        """Every rank stopped at the same step, its snapshot in memory: resize from there (or, if
        a stop came in meanwhile, end STOPPED: the paused step was not waited for in storage)."""
        if self.book.state == JobState.STOPPING:
            self.book.to(
                JobState.STOPPED,
                f"stopped at step {self.book.step} while resizing; the newest persisted checkpoint "
                "is kept: `resilient launch --resume RUN_DIR` goes on from it",
            )
            return
        self.book.to(JobState.RESIZING, self.resize_cause or "resize")

    def grow_failed(self, before: int) -> list[str] | None:
        """Capacity counts the nodes' totals, which other jobs may hold: when Ray cannot place the
        larger group, go back to `before` ranks and do not try to grow again for a while."""
        self.journal.append(
            "resize",
            step=self.book.restored,
            **{"from": self.world, "to": before},
            reason=f"Ray did not place {self.world} ranks within "
            f"{GROW_PLACE_S:g}s: the nodes' resources are held by others",
        )
        self.world = before
        self._last_size_check = self.clock() + GROW_BACKOFF_S
        return self.fleet.placement(before)

    def keep(self, group, fault, rollback: bool = False) -> None:
        """Replace the fault's rank (every rank on its node, for a lost node) and any dead one;
        the others leave the broken collective and are kept for the next attempt, unless they
        cannot (`rollback`: nor hand over what they queued of the timeline it abandons)."""
        node_fault = fault.kind in NODE_FAULTS  # its ranks are in group.dead (write_off)
        gone = sorted(set(group.dead) | {fault.rank})
        group.replace(gone)
        timeout = NODE_LEAVE_TIMEOUT_S if node_fault else LEAVE_TIMEOUT_S
        stuck = group.leave(timeout, drain=rollback)
        for rank, why in sorted(stuck.items()):
            self.journal.append("survivor_replaced", rank=rank, reason=why)
        group.replace(sorted(stuck))
        self.kept, self._kept_generation = group, getattr(self.nodes, "generation", 0)
        replaced = sorted(set(gone) | set(stuck))
        kept = [r for r in range(group.size) if r not in replaced]
        self.journal.append("survivors", replaced=replaced, kept=kept)

    def group_for(self, placement: list[str]):
        """The kept group (same reservation and size) or a new one."""
        kept, self.kept = self.kept, None
        same = getattr(self.nodes, "generation", 0) == self._kept_generation
        if kept is not None and same and kept.size == len(placement):
            kept.attempt = self.book.restarts
            return kept
        if kept is not None:
            kept.shutdown()
        return self.new_group(placement, self.book.restarts)

    def drop_kept(self) -> None:
        """Survivors kept for an attempt that never came: end them."""
        if self.kept is not None:
            self.kept.shutdown()
            self.kept = None
