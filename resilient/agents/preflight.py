"""Preflight: a quick check of every node before it trains.

Contract: `run_preflight(nodes, storage_uri, storage_options, bad=())` starts one `Probe` actor
(0 CPU) on each node of `nodes` ([(index, node_id, ip)]) and has all of them check at once; it
returns one record per node, in `nodes`' order: the known-answer computation on each device
(`training.integrity.known_answer`, plus the seconds of a fixed matmul workload), an all-reduce
among the nodes' probes (gloo, through a Ray-served store: `agents.store`), timed and its sum
checked, a write/read/remove of a probe object in `storage_uri`, and the free memory and disk.
`judge(records)` marks each record `ok` with its `reasons`: a wrong result, a failed all-reduce or
storage, less than MIN_FREE_GB of memory or disk, or a compute time (the fastest of REPEATS) over
SLOW_FACTOR times the nodes' median and SLOW_MIN_S above it. An all-reduce is the nodes' shared
act: where it failed on every node that answered, no node is blamed for it (one node that did not
answer, or a network for all, breaks it everywhere), and each record says so in `warnings`.
`bad` (node ids): chaos `bad_compute` already in place there. Everything ends within CHECK_S; the
probes are killed after. A probe asks for no GPU but sees the node's (Ray would hide them).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHECK_S = 15.0  # the whole preflight, every node at once
MIN_FREE_GB = 1.0  # memory and disk a node must have free
SLOW_FACTOR = 3.0  # a node this many times slower than the median computes too slowly
ALLREDUCE_MB = 4
REPEATS = 5  # timed compute runs per node; the fastest counts
SLOW_MIN_S = 0.05  # and a node must be this much slower than the median, too
# The check is of every device of the node, without reserving them (that would wait for a rank
# to let go); Ray versions that hide GPUs from an actor that asks for none (CUDA_VISIBLE_DEVICES
# set empty) are told not to
SEE_GPUS = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}


@ray.remote(num_cpus=0, max_concurrency=8)
class Probe:
    def __init__(self):
        from resilient.agents.store import KeyValue

        self._kv = KeyValue()

    def kv(self, op: str, *args):
        return getattr(self._kv, op)(*args)

    def check(self, rank: int, world: int, master, uri: str, options: dict, corrupt: bool) -> dict:
        from resilient.agents import rendezvous as rdv

        out = {"ip": rdv.node_ip(), "pid": os.getpid()}
        out.update(_compute(corrupt))
        out.update(_all_reduce(self, rank, world, master))
        out.update(_storage(uri, options))
        mem = _free_memory_gb()
        disk = shutil.disk_usage(tempfile.gettempdir()).free / 2**30
        out.update(mem_free_gb=round(mem, 2), disk_free_gb=round(disk, 2))
        return out


def _compute(corrupt: bool) -> dict:
    import torch

    from resilient.training.integrity import known_answer

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    ok = all(known_answer(d, corrupt) for d in devices)
    torch.set_num_threads(1)  # the same work on every node, whatever its cores
    best = float("inf")
    for _ in range(REPEATS):  # the fastest of a few: a busy neighbour's burst is not the node
        x = torch.ones(256, 256, device=devices[0])
        t0 = time.perf_counter()
        for _ in range(8):
            x = (x @ x) / 256
        float(x.sum())  # waits for a GPU
        best = min(best, time.perf_counter() - t0)
    return {
        "devices": [str(d) for d in devices],
        "compute_ok": ok,
        "compute_s": round(best, 4),
    }


def _all_reduce(probe: Probe, rank: int, world: int, master) -> dict:
    import torch
    import torch.distributed as dist

    from resilient.agents import rendezvous as rdv
    from resilient.agents.store import on_worker, ray_store

    call = probe.kv if rank == 0 else on_worker(master)
    try:
        store = ray_store(call, CHECK_S)
        rdv.init_process_group("gloo", store, rank, world, CHECK_S, rdv.node_ip())
        t = torch.full((ALLREDUCE_MB * 2**18,), float(rank + 1))
        dist.all_reduce(t)  # a first one connects the ring
        t0 = time.perf_counter()
        t.fill_(float(rank + 1))
        dist.all_reduce(t)
        seconds = time.perf_counter() - t0
        ok = bool(t[0] == world * (world + 1) / 2) and bool(t[-1] == t[0])
        return {"allreduce_ok": ok, "allreduce_s": round(seconds, 4), "allreduce_mb": ALLREDUCE_MB}
    except Exception as e:  # a link that does not carry it
        return {"allreduce_ok": False, "allreduce_error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _storage(uri: str, options: dict) -> dict:
    from resilient.rundir import RunDir

    rundir, name = RunDir(uri, options), f".preflight-{os.getpid()}-{time.time_ns()}"
    payload = os.urandom(1 << 16)
    t0 = time.perf_counter()
    try:
        rundir.write_bytes(name, payload)
        ok = rundir.read_bytes(name) == payload
        rundir.remove(name)
        return {"storage_ok": ok, "storage_s": round(time.perf_counter() - t0, 4)}
    except Exception as e:  # any storage's refusal, spelled its own way
        return {"storage_ok": False, "storage_error": f"{type(e).__name__}: {e}"[:300]}


def _free_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def run_preflight(
    nodes: list[tuple[int, str, str | None]],
    uri: str,
    options: dict,
    bad: set[str] = frozenset(),
) -> list[dict]:
    t0 = time.time()
    probes = [
        Probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=nid, soft=False),
            runtime_env=SEE_GPUS,
        ).remote()
        for _, nid, _ in nodes
    ]
    refs = [
        p.check.remote(rank, len(nodes), probes[0], uri, options, nid in bad)
        for rank, (p, (_, nid, _)) in enumerate(zip(probes, nodes, strict=True))
    ]
    records = []
    for (index, nid, ip), ref in zip(nodes, refs, strict=True):
        try:
            rec = ray.get(ref, timeout=max(1.0, CHECK_S + 30 - (time.time() - t0)))
        except Exception as e:  # the node did not answer: that is its result
            rec = {"ip": ip, "error": f"{type(e).__name__}: {e}"[:300]}
        records.append({"node": nid, "index": index, **rec})
    for p in probes:
        ray.kill(p)
    return judge(records, time.time() - t0)


def judge(records: list[dict], seconds: float = 0.0) -> list[dict]:
    """Each record with `ok` and `reasons` (pure)."""
    times = [r["compute_s"] for r in records if r.get("compute_ok")]
    median = statistics.median(times) if times else None
    answered = [r for r in records if not r.get("error")]
    shared = len(records) > 1 and not any(r.get("allreduce_ok") for r in answered)
    out = []
    for r in records:
        why, warnings = [], []
        if r.get("error"):
            why.append(f"no answer ({r['error']})")
        if r.get("compute_ok") is False:
            why.append("wrong result of the known-answer computation")
        slow = r.get("compute_s", 0) > max(SLOW_FACTOR * (median or 0), (median or 0) + SLOW_MIN_S)
        if median and len(times) > 1 and slow:
            why.append(f"compute {r['compute_s']:.3f}s, over {SLOW_FACTOR:g}x the median")
        if r.get("allreduce_ok") is False:
            failed = f"all-reduce failed ({r.get('allreduce_error', 'wrong sum')})"
            if shared:  # everywhere: not this node's fault alone
                warnings.append(failed + " on every node that answered")
            else:
                why.append(failed)
        if r.get("storage_ok") is False:
            why.append(f"storage: {r.get('storage_error', 'read back different bytes')}")
        for key, what in (("mem_free_gb", "memory"), ("disk_free_gb", "disk")):
            if r.get(key) is not None and r[key] < MIN_FREE_GB:
                why.append(f"{r[key]:.2f} GiB of {what} free (< {MIN_FREE_GB:g})")
        out.append(
            {**r, "ok": not why, "reasons": why, "warnings": warnings, "seconds": round(seconds, 3)}
        )
    return out
