"""The training thread of a TrainWorker (a mixin of TrainWorker): the step loop, evaluation,
snapshots, and how a life ends (finished, stopped, paused for a resize).

Contract: `_train(trainer, step, data_step)` runs steps until the last one, an agreed stop or an
agreed pause (`_agreed_pause`: every rank pauses after the same step, none finishes) and returns
the step reached, or None when a step was non-finite (phase "nonfinite") or the replicas disagree
(phase "sdc", with the report): such a state is never snapshotted. A step is snapshotted every
`checkpoint.every` steps, at the last one and after an evaluation; a state that leaves the group
(persisted for good, a pause's hand-over) is compared across ranks first. `_finish` makes rank 0's
last step durable and exports the adapter; `_paused` hands a resize's step to the node agent.
"""

from __future__ import annotations

import time


class TrainingLoop:
    def _next_data(self, data_step: int) -> int:
        """The data step after `data_step`, past those rollbacks took out."""
        data_step += 1
        while data_step in self.skip:
            data_step += 1
        return data_step

    def _train(self, trainer, step: int, data_step: int) -> int | None:
        """Steps until the last one or an agreed stop or pause (`_agreed_pause`: every rank
        pauses after the same step, none finishes); the step reached (None: a NaN step, or
        replicas that disagree: phase sdc, with the report)."""
        from resilient.agents.verify import Verifier  # torch: not in a spare's actor module

        restored, total = step, self.spec.train.steps
        self._agreed_pause = False
        verifier = Verifier(self.spec, self.world, self._next_data, lambda p: self._set(phase=p))
        verifier.restored(step)
        per_rank = trainer.order.count / self.world
        while step < total:
            poison = self._faults_at(step + 1)
            trainer.corrupt = self.bad_compute
            next_data = self._next_data(data_step)
            check, audit = verifier.wants(step + 1, per_rank)
            r = trainer.step(
                next_data,
                stop=self._stop.is_set(),
                poison=poison,
                slow=self.slow,
                pause=self._pause.is_set(),
                check=check,
                audit=audit,
            )
            self.reports.step(r, self.rank, step + 1, next_data, self.attempt)
            if r.nonfinite:  # no rank applied this update; the supervisor rolls back and skips it
                self._set(phase="nonfinite")
                return None
            sdc = verifier.after(trainer, step + 1, r.digests, audit) if check else None
            if sdc:  # never snapshotted, never persisted: the supervisor rolls back
                self._set(phase="sdc", sdc=sdc)
                return None
            step, data_step = step + 1, next_data
            self._stepped(r, step, data_step, first=step == restored + 1)
            if not self._keep_state(trainer, verifier, r, step, data_step):
                return None
            if r.stop or trainer.evals.stop:  # a stop (or an early stop) wins over a pause
                break
            if r.pause and step < total:
                self._agreed_pause = True
                break
        return step

    def _stepped(self, r, step: int, data_step: int, first: bool) -> None:
        """Report `step` done (the heartbeat's status)."""
        now = time.time()
        self._data_step = data_step
        self._set(
            step=step,
            mean_loss=r.mean_loss,
            step_done_at=now,
            tokens_per_s=r.tokens / max(r.step_time + r.data_wait, 1e-9),
        )
        if first:
            self._set(first_step_done_at=now)

    def _keep_state(self, trainer, verifier, r, step: int, data_step: int) -> bool:
        """After `step`: evaluate when due, snapshot when due; False when the replicas disagree on
        a state about to leave the group (phase sdc, with the report)."""
        total = self.spec.train.steps
        evaluated = self._evaluate(trainer, step)
        final = step == total or r.stop or trainer.evals.stop is not None
        # an evaluated step is persisted where the best are kept, so the best can be had
        keep = evaluated and self.spec.checkpoint.keep_best > 0
        # a state that leaves the group (persisted for good, a pause's hand-over): compared
        leaves = final or keep or (r.pause and step < total)
        sdc = verifier.before_persist(trainer, step) if leaves else None
        if sdc:
            self._set(phase="sdc", sdc=sdc)
            return False
        if step % self.spec.checkpoint.every == 0 or final or evaluated:
            self.engine.save(trainer, step, data_step, final or keep, verifier.meta(step))
            verifier.saved(self.engine.latest)
        if self.engine.error:
            raise RuntimeError(self.engine.error)
        return True

    def _evaluate(self, trainer, step: int) -> bool:
        """Evaluate after `step` when it is due (every rank: the sums are job-wide); rank 0
        reports it. Whether it was."""
        if not self.spec.eval.due(step, self.spec.train.steps):
            return False
        t0 = time.perf_counter()
        self._set(phase="evaluating")  # not a stall: the watch gives the next step a full limit
        try:
            metrics = trainer.evaluate(step)
        finally:
            self._set(phase="training")
        if metrics is None:
            return False
        if self.rank == 0:
            rec = {**metrics, "seconds": time.perf_counter() - t0, "attempt": self.attempt}
            if trainer.evals.stop:
                rec["early_stop"] = trainer.evals.stop
            self.reports.evaluation(rec)
        return True

    def _finish(self, trainer, step: int, base_ref: str) -> None:
        """Rank 0 makes the last step durable (and exports the adapter) before the job may end."""
        from resilient.rundir.layout import FINAL
        from resilient.training.adapter_io import export_to

        done = step == self.spec.train.steps or trainer.evals.stop is not None
        if self.rank == 0:
            self._set(phase="persisting")
            self.engine.drain()
            if self.engine.handed_step < step:  # resumed at its last step: nothing was handed
                self.engine.save(trainer, step, self._data_step, True)  # (re-persists atomically)
            self.engine.finish(step, self.spec.checkpoint.persist_timeout)
            if done:
                self._set(phase="exporting")
                export_to(self.rundir, trainer, FINAL, base_ref)
        self._set(phase="done" if done else "stopped")

    def _paused(self, trainer, step: int) -> None:
        """A resize: this step's snapshot (every rank keeps it) in rank 0's node agent's memory,
        then stop."""
        self._set(phase="pausing")
        latest = self.engine.latest
        if latest is None or latest.step != step:
            self.engine.save(trainer, step, self._data_step, False)
        if self.rank == 0:
            self.engine.drain()
            self.engine.flush()
        self._set(phase="paused")
