"""The rank-side checkpoint engine: `save()` blocks training only for the host-memory copy.

Contract: `save(trainer, step, data_step, final)` is collective (every rank calls it at the same
step) and returns the seconds training was blocked. Rank 0 then serialises the snapshot (safetensors
+ JSON), computes its manifest and hands it to its node's agent on a background thread, in order;
the agent replicates it to a peer and persists it when `persist` says so (every `persist_every`-th
snapshot and the final one). `finish(step)` waits until `step` is durable in storage.
`load(source, rank, store, fingerprint)` fetches and verifies a snapshot from memory or storage.
"""
from __future__ import annotations

import queue
import threading
import time

import ray

from resilient.checkpoint.snapshot import META, SHARED, Snapshot, rank_file
from resilient.checkpoint.storage import CheckpointStore, make_manifest


class CheckpointEngine:
    def __init__(self, agent, fingerprint: str, persist_every: int, every: int, rank: int):
        self.agent, self.fingerprint, self.persist_every, self.every, self.rank = (
            agent, fingerprint, persist_every, every, rank)
        self._queue: queue.Queue = queue.Queue()
        self.error: str | None = None
        self.records: list[dict] = []  # blocking time etc. of each snapshot, drained by the heartbeat
        self._lock = threading.Lock()
        if rank == 0:
            threading.Thread(target=self._handoff, daemon=True, name="ckpt-handoff").start()

    def should_persist(self, step: int, final: bool) -> bool:
        return final or (step // self.every) % self.persist_every == 0

    def save(self, trainer, step: int, data_step: int, final: bool) -> float:
        t0 = time.perf_counter()
        snap = trainer.snapshot(step, data_step, self.fingerprint)
        blocking = time.perf_counter() - t0
        if snap is not None:
            self._queue.put((snap, self.should_persist(step, final), blocking))
        return blocking

    def _handoff(self) -> None:
        while True:
            snap, persist, blocking = self._queue.get()
            try:
                t0 = time.perf_counter()
                files = snap.to_files()
                manifest = make_manifest(snap.step, files, self.fingerprint)
                ray.get(self.agent.put.remote(snap.step, files, manifest, persist))
                with self._lock:
                    self.records.append({"step": snap.step, "blocking_s": blocking, "bytes": snap.nbytes,
                                         "handoff_s": time.perf_counter() - t0, "persist": persist})
            except Exception as e:  # the agent is gone: reported, the supervisor decides
                self.error = f"checkpoint handoff failed at step {snap.step}: {type(e).__name__}: {e}"
            finally:
                self._queue.task_done()

    def drain_records(self) -> list[dict]:
        with self._lock:
            out, self.records = self.records, []
        return out

    def drain(self) -> None:
        """Wait until every snapshot taken so far is in the node agent's memory."""
        self._queue.join()

    def finish(self, step: int, timeout: float) -> None:
        """Wait until every snapshot is handed over and `step` is persisted (rank 0)."""
        self.drain()
        if self.error:
            raise RuntimeError(self.error)
        if not ray.get(self.agent.wait_persisted.remote(step, timeout)):
            raise TimeoutError(f"step {step} was not persisted within checkpoint.persist_timeout={timeout}s")


def load(source: dict, rank: int, store: CheckpointStore, fingerprint: str) -> Snapshot:
    """The snapshot `source` names ({step, tier, agent}), verified; a rank fetches only its parts."""
    step = source["step"]
    if source.get("agent") is not None:
        got = ray.get(source["agent"].fetch.remote(step, [SHARED, META, rank_file(rank)], fingerprint))
        return Snapshot.from_files(got["files"])
    return Snapshot.from_files(store.load(step, fingerprint))
