"""The background persister: streams a node's pending snapshots to storage, oldest first.

Contract: `Persister(tier, store, ...)` runs one daemon thread. Each pending snapshot is committed
with `CheckpointStore.commit` (files, then the manifest: atomic visibility); a storage error is
retried with exponential backoff (0.5 s doubling to `max_backoff`) while training goes on. Every
commit, failure and retention deletion becomes an event for the journal (`drain_events`).
Retention costs no listing per commit: the committed steps are listed once and then kept here
(again after `protect()`, which a restart calls: another node may have committed meanwhile), and a
`protect`ed step (the one being restored) is never deleted. `keep_best` > 0 keeps that many
committed steps with the lowest eval loss too, at no request per commit: a committed snapshot's
loss comes from its own manifest, and a listed step's (another node's, or an earlier process's)
from its manifest, read once when first listed (`scores`: bounded by the committed steps).
`wait_persisted(step, timeout)` blocks until that step is in storage (the steps known persisted
are those retention keeps: bounded, whatever the run's length; it is asked for the newest).
"""

from __future__ import annotations

import bisect
import threading
import time

from resilient.checkpoint.memory import MemoryTier
from resilient.checkpoint.storage import CheckpointStore, Fenced, eval_loss


class Persister:
    def __init__(
        self,
        tier: MemoryTier,
        store: CheckpointStore,
        keep: int,
        keep_every: int,
        max_backoff: float = 8.0,
        may_write=lambda: True,
        generation=None,
        keep_best: int = 0,
    ):
        """`keep_best`: also keep that many committed steps with the lowest eval loss (0: off).
        `may_write()`: whether this process still holds its lease; checked before every
        storage request (a fenced persister writes and deletes nothing, ever again).
        `generation()`: this writer's generation, checked against the run's fence before a
        commit becomes visible and before retention deletes (`storage.generation_fence`)."""
        self.tier, self.store, self.keep, self.keep_every, self.max_backoff = (
            tier,
            store,
            keep,
            keep_every,
            max_backoff,
        )
        self.keep_best = keep_best
        self.persisted: set[int] = set()
        # committed step -> eval loss (None: its manifest has none): each manifest read once
        self.scores: dict[int, float | None] = {}
        self.committed: list[int] | None = None  # in storage; None: list it at the next retention
        # Set by protect() (another thread): list again at the next retention. Only the persister
        # thread touches `committed`, which a protect() in mid-retention must not pull away.
        self._relist = False
        self.protected: frozenset[int] = frozenset()
        self.outage_until = 0.0
        self.may_write, self.generation = may_write, generation
        self._events: list[dict] = []
        self._events_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="persister")
        self._thread.start()

    def event(self, **e) -> None:
        with self._events_lock:
            self._events.append({"t": time.time(), **e})

    def drain_events(self) -> list[dict]:
        with self._events_lock:
            out, self._events = self._events, []
        return out

    def _loop(self) -> None:
        delay = 0.5
        while True:
            with self.tier.lock:
                entry = self.tier.claim()
                if entry is None:
                    self.tier.lock.wait(timeout=1.0)
                    continue
            t0 = time.time()
            if not self.may_write():
                return  # fenced: this process is ending, and nothing of it may reach storage
            try:
                if time.time() < self.outage_until:  # chaos `storage_outage`: refuse writes
                    raise ConnectionRefusedError("storage unavailable (injected storage_outage)")
                m = self.store.commit(entry.files, entry.manifest, self.may_write, self.generation)
            except Fenced as e:  # a zombie of an earlier generation: never again
                self.event(event="fenced", step=entry.step, error=str(e)[:300])
                return
            except Exception as e:  # storage refused or timed out: keep the snapshot, retry later
                self.tier.release()  # (newer ones may push it out meanwhile)
                self.event(
                    event="persist_error",
                    step=entry.step,
                    error=f"{type(e).__name__}: {e}"[:300],
                    retry_in=delay,
                )
                time.sleep(delay)
                delay = min(self.max_backoff, delay * 2)
                continue
            delay = 0.5
            with self.tier.lock:
                forgotten = self.tier.get(entry.step) is not entry
                if not forgotten:
                    self.persisted.add(entry.step)
                    self.tier.mark_persisted(entry.step)
            if forgotten:  # a rollback abandoned it during the upload: it must not stay
                self._undo(entry.step)
                continue
            size = sum(f["size"] for f in m["files"].values())
            self.event(
                event="persisted",
                step=entry.step,
                seconds=time.time() - t0,
                bytes=size,
                persisted_at=m["persisted_at"],
            )
            self._retain(entry.step, eval_loss(entry.manifest))

    def _undo(self, step: int) -> None:
        try:
            self.store.discard(step)
            self.event(event="abandoned", step=step)
        except Exception as e:  # the supervisor's abandon_after finds it in the listing
            self.event(event="abandoned", step=step, error=f"{type(e).__name__}: {e}"[:300])

    def protect(self, steps: set[int]) -> None:
        """Never delete `steps` (being restored); re-list the committed steps at the next
        retention."""
        self.protected, self._relist = frozenset(steps), True

    def _retain(self, step: int, loss: float | None) -> None:
        try:
            self.scores[step] = loss  # from the manifest just committed: no request
            if self.committed is None or self._relist:
                self._relist = False
                self.committed = self.store.steps()
                self._learn_scores(step)
            if step not in self.committed:
                bisect.insort(self.committed, step)
            deleted = self.store.retain(
                self.keep,
                self.keep_every,
                self.committed,
                self.protected,
                self.may_write,
                self.generation,
                self.keep_best,
                {s: v for s, v in self.scores.items() if v is not None},
            )
            self.committed = [s for s in self.committed if s not in deleted]
            for s in deleted:
                self.scores.pop(s, None)  # (without keep_best, listed steps have no entry)
                self.persisted.discard(s)  # bounded by retention, not by the run's length
            if deleted:
                self.event(event="retention", deleted=deleted)
        except Exception as e:  # tried again after the next commit
            self.committed = None
            self.event(event="retention_error", error=str(e)[:300])

    def _learn_scores(self, fresh: int) -> None:
        """After a listing: forget steps no longer committed, read the manifests of listed steps
        not seen yet (only when keeping the best: otherwise no score is needed). `fresh`, just
        committed here, is known even where the listing does not show it yet."""
        listed = set(self.committed) | {fresh}
        self.scores = {s: v for s, v in self.scores.items() if s in listed}
        if self.keep_best > 0:
            for s in listed - self.scores.keys():
                self.scores[s] = self.store.eval_loss(s)

    def wait_persisted(self, step: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        with self.tier.lock:
            while step not in self.persisted:
                left = deadline - time.time()
                if left <= 0:
                    return False
                self.tier.lock.wait(timeout=min(left, 1.0))
        return True
