"""NodeAgent: one long-lived actor per node; outlives worker restarts.

Contract: samples the node's GPUs (NVML, or a simulated GPU) and host every `anomaly.interval`;
holds the node's memory tier of checkpoints (primary copies from the ranks on this node, replicas
from a peer node), forwards each primary copy to its peer agent, and persists primaries to storage
in the background. `inventory()` says what it holds, `fetch()` hands out verified files, `events()`
drains what happened (persisted, persist errors, drops, replications) for the journal. It never
unpickles anything from storage. For a large job it relays its ranks' heartbeats and lease renewals
(`attach`, `gather`; agents.relay), on two threads of its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque

import psutil
import ray

from resilient import heap
from resilient.agents.lease import Lease
from resilient.agents.priority import lower_main_thread
from resilient.agents.relay import Relay, RelayMethods
from resilient.anomaly.collectors import HostCollector, open_gpu_collector
from resilient.anomaly.simulated import SimulatedNvml
from resilient.checkpoint.memory import Entry, MemoryTier
from resilient.checkpoint.persister import Persister
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore, verify_files
from resilient.config import AnomalyConfig, CheckpointConfig
from resilient.rundir import RunDir
from resilient.rundir.layout import CONTROL, SPEC_FILE

REPLICA_S = 3.0  # a replication's deadline: this, plus its bytes at REPLICA_BYTES_PER_S
REPLICA_BYTES_PER_S = 100e6


@ray.remote(num_cpus=0, max_concurrency=16, concurrency_groups={"lease": 1, "relay": 2})
class NodeAgent(RelayMethods):
    def __init__(
        self,
        node_id: str,
        run_uri: str,
        ckpt: dict,
        anomaly: dict | None = None,
        fence_s: float = 8.0,
        generation: int = 0,
    ):
        """`fence_s`: with no word from the supervisor for that long this agent writes nothing
        more and ends (its node was lost or cut off; see agents.lease). `generation`: the run's
        writer generation it commits under (`set_generation`; storage.generation_fence)."""
        # before this actor starts its threads (lease, persister, fsspec's, sampler): each that
        # allocates could otherwise take a malloc arena of its own and keep what it freed
        heap.limit_arenas()
        self.generation = generation
        cfg = CheckpointConfig.model_validate(ckpt)
        self.node_id = node_id
        self.lease = Lease(fence_s, lambda: os._exit(1))
        self.relay = Relay()
        self.tier = MemoryTier(keep=cfg.memory_keep, max_pending=cfg.max_pending)
        self.persister = Persister(
            self.tier,
            CheckpointStore(RunDir(run_uri, cfg.storage_options)),
            keep=cfg.keep,
            keep_every=cfg.keep_every,
            keep_best=cfg.keep_best,
            may_write=self.lease.valid,
            generation=lambda: self.generation,
        )
        self.peer = None
        self._gpu_faults_done: set = set()  # keys of the GPU faults carried out (each once)
        self._gpu_lock = threading.Lock()
        self.pids: dict[int, int] = {}
        self.samples: deque = deque(maxlen=10_000)
        self.anomaly = AnomalyConfig.model_validate(anomaly or {})
        self.sim = SimulatedNvml(1) if self.anomaly.gpu == "simulated" else None
        self.gpu, self.gpu_status = open_gpu_collector(self.anomaly.gpu, self.sim)
        self.host = HostCollector()
        self._wake, self._sample_lock = threading.Event(), threading.Lock()
        threading.Thread(target=self._sample_loop, daemon=True, name="sampler").start()

    # -- metrics (TEE collectors) ------------------------------------------------------------------
    def _sample_loop(self) -> None:
        trimmer = heap.Trimmer()  # freed memory back to the system once a minute: flat RSS
        while True:
            t0 = time.perf_counter()
            trimmer.maybe()
            self._sample_once()
            self._wake.wait(max(0.0, self.anomaly.interval - (time.perf_counter() - t0)))
            self._wake.clear()

    def _sample_once(self) -> None:
        t0 = time.perf_counter()
        try:
            with self._sample_lock:
                gpus = self.gpu.sample() if self.gpu else []
                host = self.host.sample(dict(self.pids))
            self.samples.append({"gpus": gpus, "host": host, "cost_s": time.perf_counter() - t0})
        except Exception as e:  # a collector bug must not take the checkpoint tier down
            self.persister.event(event="collector_error", error=f"{type(e).__name__}: {e}"[:300])

    def register(self, rank: int, pid: int) -> None:
        """A rank on this node: its RSS is sampled from now on (the previous attempt's ranks are
        dropped)."""
        alive = {r: p for r, p in self.pids.items() if r != rank and psutil.pid_exists(p)}
        self.pids = alive | {rank: pid}

    def gpu_fault(self, fault: str, params: dict, gpu: int = 0) -> str:
        """Chaos on the simulated GPU of this node: gpu_xid (`xid`), gpu_lost, ecc (`count`),
        thermal (`temperature`); other parameters are ignored. A fault with a `key` happens
        once, however many ranks on this node carry it out."""
        if self.sim is None:
            raise RuntimeError('GPU faults need anomaly.gpu = "simulated"')
        key = params.get("key")
        with self._gpu_lock:  # ranks call concurrently (a threaded actor)
            if key is not None and key in self._gpu_faults_done:
                return self.gpu_status
            self._gpu_faults_done.add(key)
        if fault == "gpu_xid":
            self.sim.xid(gpu, params.get("xid", 79))
        elif fault == "gpu_lost":
            self.sim.lose(gpu)
        elif fault == "ecc":
            g, n = self.sim.gpus[gpu], params.get("count", 1)
            self.sim.set(
                gpu, ecc_volatile=g["ecc_volatile"] + n, ecc_aggregate=g["ecc_aggregate"] + n
            )
        elif fault == "thermal":
            self.sim.set(gpu, temp=params.get("temperature", 95.0), throttle=0x40)
        self._wake.set()  # sample now: the fault is seen within one event poll, not one interval
        return self.gpu_status

    def info(self) -> dict:
        """Where this agent runs; the supervisor's first call (which lowers Ray's main thread
        here: agents.priority)."""
        lower_main_thread()
        return {"node_id": self.node_id, "pid": os.getpid()}

    def set_generation(self, generation: int) -> None:
        """The supervisor wrote a node off: this (live) agent commits under the new generation."""
        self.generation = max(self.generation, generation)

    def check_storage(self) -> str | None:
        """Whether this node can read and write the run directory (its credentials, endpoint and
        network): None, or what failed. A probe object is written and removed."""
        rundir, probe = self.persister.store.rundir, f"{CONTROL}/probe-{self.node_id[:12]}"
        step = "read"
        try:
            rundir.read_bytes(SPEC_FILE)
            step = "write"
            rundir.write_bytes(probe, b"ok")
            rundir.remove(probe)
            return None
        except Exception as e:  # any storage's refusal, spelled its own way
            return f"cannot {step} the run directory {rundir.uri} ({type(e).__name__}: {e})"[:400]

    @ray.method(concurrency_group="lease")
    def renew(self, sent_at: float) -> bool:
        """The supervisor's lease renewal (a thread of its own: never queued behind work), passed
        on to the ranks this agent relays when it holds (a stale one renews nothing)."""
        ok = self.lease.renew(sent_at)
        if ok:
            self.relay.renew(sent_at)
        return ok

    def set_peer(self, peer) -> None:
        self.peer = peer

    def put(self, step: int, files: dict[str, bytes], manifest: dict, persist: bool) -> None:
        """A rank on this node hands over a snapshot (primary copy)."""
        for ev in self.tier.put(Entry(step, files, manifest, role="memory", persist=persist)):
            self.persister.event(**ev)
        # synchronous here, but off the training thread (the rank's handoff); a peer that does not
        # take it within a few seconds is cut off: the primary copy and storage remain
        if self.peer is not None:
            t0 = time.time()
            deadline = REPLICA_S + sum(len(b) for b in files.values()) / REPLICA_BYTES_PER_S
            try:
                ray.get(self.peer.put_replica.remote(step, files, manifest), timeout=deadline)
                self.persister.event(event="replicated", step=step, seconds=time.time() - t0)
            except Exception as e:  # the peer node is gone: the primary copy and storage remain
                self.persister.event(
                    event="replication_failed", step=step, error=str(e).splitlines()[0][:200]
                )

    def put_replica(self, step: int, files: dict[str, bytes], manifest: dict) -> None:
        self.tier.put(Entry(step, files, manifest, role="peer"))

    def has(self, step: int) -> bool:
        """Whether a copy of `step` (own or a peer's replica) is in this node's memory."""
        return self.tier.get(step) is not None

    def inventory(self) -> list[dict]:
        return self.tier.inventory()

    def forget_after(self, step: int) -> list[int]:
        """Drop every snapshot newer than `step` (a rollback's; see MemoryTier.forget_after)."""
        return self.tier.forget_after(step)

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

    def protect(self, steps: set[int]) -> None:
        """Retention must not delete these steps (a group is restoring one of them)."""
        self.persister.protect(steps)

    def wait_persisted(self, step: int, timeout: float) -> bool:
        return self.persister.wait_persisted(step, timeout)

    def events(self) -> dict:
        """What happened since the last call: checkpoint events and metric samples."""
        samples = []
        while self.samples:
            samples.append(self.samples.popleft())
        return {
            "events": self.persister.drain_events(),
            "samples": samples,
            "gpu_status": self.gpu_status,
        }

    def storage_outage(self, seconds: float) -> None:
        """Chaos: this node's persister finds storage refusing every write for `seconds`."""
        self.persister.outage_until = time.time() + seconds

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
