"""The rank-side checkpoint engine: `save()` blocks training only for the host-memory copy.

Contract: `save(trainer, step, data_step, final)` is local to the rank (no collective): every rank
takes a host copy of the state after `step` and keeps the newest in its own memory (`latest`); the
state is the same on every DDP rank, so any survivor of a fault holds the freshest one. Rank 0 hands
snapshots to its node's agent on a background thread, in order: every one that must persist (every
`persist_every`-th snapshot and the final one) and, between those, the newest at most every
`handoff_s` seconds (0 = every snapshot); the agent replicates each to a peer and persists those
marked. `flush()` hands this rank's newest snapshot to its agent now (the supervisor calls it
on a survivor before a restart, so a restart replays nothing). `drain(timeout)` waits until what
is queued is handed over (a survivor of a rollback, before the abandoned steps are forgotten);
`rewind()` forgets the newest snapshot once the rank restored an older step.
"""

from __future__ import annotations

import queue
import threading
import time

import ray

from resilient.checkpoint.snapshot import Snapshot
from resilient.checkpoint.storage import make_manifest

# a node agent that does not take a snapshot this fast is lost or cut off (its node), and the call
# raises: the deadline is this, plus the snapshot's bytes at HANDOFF_BYTES_PER_S (it replicates it)
HANDOFF_S = 5.0
HANDOFF_BYTES_PER_S = 50e6


class CheckpointEngine:
    def __init__(
        self,
        agent,
        fingerprint: str,
        persist_every: int,
        every: int,
        rank: int,
        handoff_s: float = 0.0,
    ):
        self.agent, self.fingerprint, self.persist_every, self.every, self.rank = (
            agent,
            fingerprint,
            persist_every,
            every,
            rank,
        )
        self.handoff_s = handoff_s
        self._queue: queue.Queue = queue.Queue()
        self.error: str | None = None
        self.records: list[
            dict
        ] = []  # blocking time etc. of each handed-off snapshot, drained by the heartbeat
        self.latest: Snapshot | None = None
        self.handed_step = -1  # the newest step this rank gave its agent
        self._last_handoff = 0.0
        self._lock = threading.Lock()
        if rank == 0:
            threading.Thread(target=self._handoff, daemon=True, name="ckpt-handoff").start()

    def should_persist(self, step: int, final: bool) -> bool:
        return final or (step // self.every) % self.persist_every == 0

    def save(
        self, trainer, step: int, data_step: int, final: bool, integrity: dict | None = None
    ) -> float:
        """Snapshot `step` (and hand it over, rank 0); `integrity`: how the replicas' agreement on
        it was checked, for the manifest."""
        t0 = time.perf_counter()
        snap = trainer.snapshot(step, data_step, self.fingerprint)
        if integrity:
            snap.meta["integrity"] = integrity
        blocking = time.perf_counter() - t0
        self.latest = snap
        if self.rank == 0:
            persist = self.should_persist(step, final)
            now = time.monotonic()
            if persist or now - self._last_handoff >= self.handoff_s:
                self._last_handoff = now
                self._queue.put((snap, persist, blocking))
        return blocking

    def _put(self, snap: Snapshot, persist: bool) -> float:
        """Hand `snap` to this node's agent; returns the seconds it took."""
        t0 = time.perf_counter()
        files = snap.to_files()
        evaluated = (snap.meta.get("evals") or {}).get("eval")
        extra = {"eval": evaluated} if evaluated else {}  # retention keeps the best by it
        if snap.meta.get("integrity"):  # `ckpt list` shows it; a rollback trusts it
            extra["integrity"] = snap.meta["integrity"]
        manifest = make_manifest(snap.step, files, self.fingerprint, **extra)
        deadline = HANDOFF_S + sum(len(b) for b in files.values()) / HANDOFF_BYTES_PER_S
        ray.get(self.agent.put.remote(snap.step, files, manifest, persist), timeout=deadline)
        with self._lock:
            self.handed_step = max(self.handed_step, snap.step)
        return time.perf_counter() - t0

    def _handoff(self) -> None:
        while True:
            snap, persist, blocking = self._queue.get()
            try:
                seconds = self._put(snap, persist)
                with self._lock:
                    self.records.append(
                        {
                            "step": snap.step,
                            "blocking_s": blocking,
                            "bytes": snap.nbytes,
                            "handoff_s": seconds,
                            "persist": persist,
                        }
                    )
            except Exception as e:  # the agent is gone: reported, the supervisor decides
                self.error = (
                    f"checkpoint handoff failed at step {snap.step}: {type(e).__name__}: {e}"
                )
            finally:
                self._queue.task_done()

    def flush(self) -> int | None:
        """Hand the newest snapshot to this node's agent unless it holds that step already (its own
        or a peer's replica); returns the step (None: no snapshot yet)."""
        snap = self.latest
        if snap is None:
            return None
        if snap.step > self.handed_step and not ray.get(
            self.agent.has.remote(snap.step), timeout=HANDOFF_S
        ):
            self._put(snap, False)
        return snap.step

    def drain_records(self) -> list[dict]:
        with self._lock:
            out, self.records = self.records, []
        return out

    def drain(self, timeout: float | None = None) -> bool:
        """Wait (up to `timeout`; None: as long as it takes) until every snapshot queued so far is
        in the node agent's memory; whether it is."""
        done = self._queue.all_tasks_done  # the condition Queue.join() itself waits on
        with done:
            return done.wait_for(lambda: not self._queue.unfinished_tasks, timeout)

    def rewind(self) -> None:
        """The rank's state went back (a rollback it survived): its newer snapshot is of an
        abandoned timeline, never to be handed over again, and the steps it hands over from now
        on are new even where their numbers were handed before."""
        with self._lock:
            self.latest, self.handed_step = None, -1

    def finish(self, step: int, timeout: float) -> None:
        """Wait until every snapshot is handed over and `step` is persisted (rank 0)."""
        self.drain()
        if self.error:
            raise RuntimeError(self.error)
        if not ray.get(self.agent.wait_persisted.remote(step, timeout)):
            raise TimeoutError(
                f"step {step} was not persisted within checkpoint.persist_timeout={timeout}s"
            )
