"""NodeAgent: one long-lived actor per node; outlives worker restarts.

Contract: holds the node's memory tier of checkpoints (primary copies from the ranks on this node,
replicas from a peer node), forwards each primary copy to its peer agent, and persists primaries to
storage in the background. `inventory()` says what it holds, `fetch()` hands out verified files,
`events()` drains what happened (persisted, persist errors, drops, replications) for the journal.
It never unpickles anything from storage.
"""
from __future__ import annotations

import os
import time

import ray

from resilient.checkpoint.memory import Entry, MemoryTier
from resilient.checkpoint.persister import Persister
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore, verify_files
from resilient.config import CheckpointConfig
from resilient.rundir import RunDir


@ray.remote(num_cpus=0, max_concurrency=16)
class NodeAgent:
    def __init__(self, node_id: str, run_uri: str, ckpt: dict):
        cfg = CheckpointConfig.model_validate(ckpt)
        self.node_id = node_id
        self.tier = MemoryTier(keep=cfg.memory_keep, max_pending=cfg.max_pending)
        self.persister = Persister(self.tier, CheckpointStore(RunDir(run_uri, cfg.storage_options)),
                                   keep=cfg.keep, keep_every=cfg.keep_every)
        self.peer = None

    def info(self) -> dict:
        return {"node_id": self.node_id, "pid": os.getpid()}

    def set_peer(self, peer) -> None:
        self.peer = peer

    def put(self, step: int, files: dict[str, bytes], manifest: dict, persist: bool) -> None:
        """A rank on this node hands over a snapshot (primary copy)."""
        for ev in self.tier.put(Entry(step, files, manifest, role="memory", persist=persist)):
            self.persister.event(**ev)
        if self.peer is not None:  # synchronous here, but off the training thread (the rank's handoff)
            t0 = time.time()
            try:
                ray.get(self.peer.put_replica.remote(step, files, manifest), timeout=60)
                self.persister.event(event="replicated", step=step, seconds=time.time() - t0)
            except Exception as e:  # the peer node is gone: the primary copy and storage remain
                self.persister.event(event="replication_failed", step=step, error=str(e).splitlines()[0][:200])

    def put_replica(self, step: int, files: dict[str, bytes], manifest: dict) -> None:
        self.tier.put(Entry(step, files, manifest, role="peer"))

    def inventory(self) -> list[dict]:
        return self.tier.inventory()

    def fetch(self, step: int, names: list[str] | None, fingerprint: str) -> dict:
        """Verified files of `step` (all, or `names`) and the manifest; raises CheckpointInvalid."""
        e = self.tier.get(step)
        if e is None:
            raise CheckpointInvalid(f"step {step}: no longer in memory on node {self.node_id[:8]}")
        files = {n: b for n, b in e.files.items() if names is None or n in names}
        verify_files(files, e.manifest, step, fingerprint)
        return {"files": files, "manifest": e.manifest, "role": e.role}

    def verify(self, step: int, fingerprint: str) -> str | None:
        """None if the copy of `step` verifies, else the reason."""
        try:
            self.fetch(step, None, fingerprint)
            return None
        except CheckpointInvalid as e:
            return str(e)

    def wait_persisted(self, step: int, timeout: float) -> bool:
        return self.persister.wait_persisted(step, timeout)

    def events(self) -> list[dict]:
        return self.persister.drain_events()

    def corrupt(self, step: int) -> bool:
        """Chaos and tests: flip bytes of the in-memory copy of `step`."""
        e = self.tier.get(step)
        if e is None:
            return False
        name = sorted(e.files)[0]
        data = bytearray(e.files[name])
        data[len(data) // 2] ^= 0xFF
        e.files[name] = bytes(data)
        return True
