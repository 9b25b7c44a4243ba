"""Verifier: a rank's side of the replica digests and compute audits (`training.integrity`).

Contract: every rank holds one and calls it at the same points with the same arguments, so every
collective it starts is started by all (the decisions depend only on the step, the spec and the
all-gathered digests, which every rank has alike).
- `wants(step)`: (check, audit) for the step about to run (`checkpoint.checked` / `audited`; one
  rank compares with nobody).
- `after(trainer, step, digests, audited)`: judges a checked step. Agreed: remembers it as the
  newest agreed (and audited) step. Otherwise returns the report for the supervisor (the heartbeat's
  `sdc`): the step, what failed, the suspect rank(s) and the step to roll back to. With two
  replicas that differ, nobody is outvoted: both recompute from their last agreed snapshot up to
  this step, and the replica that differs from the recomputation is the odd one. When audits fail
  and the ring does not name the rank whose work is wrong (two ranks), every rank runs the
  known-answer test and those that fail it are.
- `before_persist(trainer, step)`: a step about to be persisted or handed over that was not
  checked (a stop, the last step, a kept evaluation, a resize's pause) is checked now, digests
  only; the same report on a mismatch.
- `meta(step)`: what the manifest records of the step's check (`integrity`: agreed, audited).
- `saved(snapshot)`: the snapshot taken after an agreed step is kept as the recomputation's start.
- `restored(step)`: a new life starts from a verified state.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from resilient.config import JobSpec
from resilient.training.integrity import Check, culprit_of, judge, known_answer


class Verifier:
    def __init__(
        self,
        spec: JobSpec,
        world: int,
        next_data: Callable[[int], int],
        phase: Callable[[str], None] = lambda phase: None,
    ):
        """`phase(name)`: the rank's phase while it recomputes ("verifying": progress to the
        supervisor's watch, not a stall) and after ("training")."""
        self.cfg, self.world, self.next_data, self.phase = spec.checkpoint, world, next_data, phase
        self.agreed = self.audited = 0  # newest steps whose digests agreed / passed an audit
        self._snap = None  # the snapshot of an agreed step (a recomputation's start)
        self._checked = 0  # the newest step compared

    def restored(self, step: int) -> None:
        self.agreed = self.audited = self._checked = step
        self._snap = None

    def wants(self, step: int, microbatches_per_rank: float) -> tuple[bool, bool]:
        if self.world < 2 or not self.cfg.checked(step):
            return False, False
        return True, self.cfg.audited(step, microbatches_per_rank)

    def after(self, trainer, step: int, digests, audited: bool) -> dict | None:
        check = judge(digests, step, audited)
        self._checked = step
        if check.ok:
            self.agreed = step
            self.audited = step if audited else self.audited
            return None
        return self._report(trainer, check)

    def before_persist(self, trainer, step: int) -> dict | None:
        if self.world < 2 or self.cfg.verify_every == 0 or self._checked == step:
            return None
        return self.after(trainer, step, trainer.gather_digests(), False)

    def meta(self, step: int) -> dict | None:
        """What the manifest of `step` records of its check (None: not checked)."""
        if self.world < 2 or step != self.agreed or step != self._checked:
            return None
        return {"agreed": True, "audited": self.audited == step, "ranks": self.world}

    def saved(self, snap) -> None:
        if snap is not None and snap.step == self.agreed:
            self._snap = snap

    def _report(self, trainer, check: Check) -> dict:
        odd, culprits = check.odd, ()
        if not check.agreed and not odd and self.world == 2:
            odd = self._recompute(trainer, check)
        if check.failed_audits:
            found = culprit_of(check.failed_audits, self.world)
            culprits = (found,) if found is not None else self._known_answer(trainer)
        suspects = tuple(culprits) or tuple(odd)
        return {
            "step": check.step,
            "agreed": check.agreed,
            "digests": [str(d) for d in check.digests],
            "odd": list(odd),
            "failed_audits": [list(p) for p in check.failed_audits],
            "culprits": list(culprits),
            "rank": suspects[0] if len(suspects) == 1 else None,
            # work that did not reproduce: back to the newest audit passed, else the newest agreed
            "rollback_to": self.audited if check.failed_audits else self.agreed,
        }

    def _recompute(self, trainer, check: Check) -> tuple[int, ...]:
        """Both replicas from the last agreed snapshot up to the step again: the odd one is the
        replica that differs from the recomputed state (nothing, if no snapshot or they differ
        again). A corrupted replica's gradients were averaged into the other's updates, so both
        may differ from it: then the odd one is the one farther from it where the two differ."""
        self.phase("verifying")
        try:
            return self._replay(trainer, check)
        finally:
            self.phase("training")

    def _replay(self, trainer, check: Check) -> tuple[int, ...]:
        ok = self._snap is not None
        flags = [0] * self.world
        dist.all_gather_object(flags, ok)
        if not all(flags):  # one rank has no start: nobody recomputes
            return ()
        live = torch.cat([p.detach().reshape(-1).float() for p in trainer.params])
        trainer.restore(self._snap)
        step, data_step = self._snap.step, self._snap.data_step
        digests = ()
        while step < check.step:
            data_step = self.next_data(data_step)
            step += 1
            digests = trainer.step(data_step, check=step == check.step).digests
        again = judge(digests, check.step, False)
        if not again.agreed:
            return ()
        odd = tuple(r for r, d in enumerate(check.digests) if d != again.digests[0])
        if len(odd) < self.world:
            return odd
        lives = [torch.empty_like(live) for _ in range(self.world)]
        dist.all_gather(lives, live)
        clean = torch.cat([p.detach().reshape(-1).float() for p in trainer.params])
        apart = lives[0] != lives[1]
        far = [float((x[apart] - clean[apart]).abs().sum()) for x in lives]
        return (max(range(self.world), key=far.__getitem__),) if far[0] != far[1] else ()

    def _known_answer(self, trainer) -> tuple[int, ...]:
        flags = [True] * self.world
        dist.all_gather_object(flags, known_answer(trainer.device, trainer.corrupt))
        return tuple(r for r, ok in enumerate(flags) if not ok)
