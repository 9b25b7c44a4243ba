"""Checkpoint benchmark: what a checkpoint costs training, side by side, in one run.

For the same state (the tiny LoRA training state, and a ~1 GB state) it measures:
  (a) resilient's blocking time (the host-memory copy; serialisation, replication and persistence
      happen off the training thread),
  (b) a synchronous torch.save of the same state to the same storage (fsync'd),
  (c) torch.distributed.checkpoint.async_save's blocking time, where it runs,
  a plain host copy of the same bytes, resilient's persist throughput vs a plain fsspec put of the
  same bytes, and the step-time overhead of checkpointing every step vs never (real TrainWorker
  loop: DDP over gloo, a real NodeAgent on Ray).
Usage: python bench/checkpoint.py [--big-gb 1.0] [--repeats 5] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from resilient.checkpoint.snapshot import Snapshot, host_copy  # noqa: E402
from resilient.checkpoint.storage import CheckpointStore, make_manifest  # noqa: E402
from resilient.rundir import RunDir  # noqa: E402


def median_time(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def big_state(gb: float) -> dict[str, torch.Tensor]:
    n = 16
    per = int(gb * 2**30 / 4 / n)
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(n)}


def tiny_state() -> dict[str, torch.Tensor]:
    """The real tiny-llama LoRA training state: adapter weights + AdamW moments."""
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import apply_adapter, build_tiny_llama, load_base

    with tempfile.TemporaryDirectory() as d:
        build_tiny_llama(d, BYTE_VOCAB)
        model = apply_adapter(
            load_base(d),
            {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            0,
        )
    state = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            state[f"model.{n}"] = p.detach()
            state[f"optim.{n}.exp_avg"] = torch.randn_like(p)
            state[f"optim.{n}.exp_avg_sq"] = torch.rand_like(p)
    return state


def sync_torch_save(state, d):
    path = os.path.join(d, "sync.pt")
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def dcp_async_blocking(state, d, repeats):
    try:
        import torch.distributed.checkpoint as dcp
    except ImportError:
        return None, "torch.distributed.checkpoint missing"
    times, futures = [], []
    try:
        for i in range(repeats):
            t0 = time.perf_counter()
            fut = dcp.async_save({"state": dict(state)}, checkpoint_id=os.path.join(d, f"dcp{i}"))
            times.append(time.perf_counter() - t0)
            futures.append(fut)
            fut.result()
    except Exception as e:  # async_save needs features this torch/platform may lack
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    return statistics.median(times), ""


def persist_vs_put(state, d, repeats):
    snap = Snapshot(step=1, data_step=1, shared=state)
    files = snap.to_files()
    total = sum(len(b) for b in files.values())
    store = CheckpointStore(RunDir(f"file://{d}/run"))
    manifest = make_manifest(1, files, "bench")
    t_commit = median_time(lambda: store.commit(files, manifest), repeats)
    rd = RunDir(f"file://{d}/plain")

    def plain():
        for name, data in files.items():
            rd.fs.pipe_file(rd.path(name), data)

    def plain_durable():
        for name, data in files.items():
            with open(rd.path(name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    rd.makedirs()
    t_put = median_time(plain, repeats)
    t_durable = median_time(plain_durable, repeats)
    return total / t_commit, total / t_put, total / t_durable


def step_overhead(steps: int) -> tuple[float, float]:
    """Median step time of the real training loop with a snapshot every step vs never.

    1 rank, gloo.
    """
    import ray
    import torch.distributed as dist

    from resilient.agents.node_agent import NodeAgent
    from resilient.checkpoint.engine import CheckpointEngine
    from resilient.config import validate_tree
    from resilient.training.corpus import write_corpus
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama
    from resilient.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        write_corpus(f"{d}/c.txt", 500)
        build_tiny_llama(f"{d}/base", BYTE_VOCAB)
        spec = validate_tree(
            {
                "name": "bench",
                "data": {"path": f"{d}/c.txt", "seq_len": 64},
                "train": {"batch_size": 4, "steps": steps * 2},
                "checkpoint": {"storage": f"{d}/runs", "persist_every": 10},
            }
        )
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}",
            rank=0,
            world_size=1,
        )
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            # no supervisor renews its lease here: a long one
            agent = NodeAgent.remote(
                "bench", f"file://{d}/runs/bench/r", spec.checkpoint.model_dump(), None, 3600.0
            )
            trainer = Trainer(spec, 0, 1, f"{d}/base", torch.device("cpu"))
            trainer.setup()
            engine = CheckpointEngine(
                agent, spec.fingerprint(), 10, 1, 0, spec.checkpoint.handoff_s
            )
            never, every = [], []
            for s in range(1, 2 * steps + 1):  # interleave so both see the same machine state
                t0 = time.perf_counter()
                trainer.step(s)
                if s % 2 == 0:
                    engine.save(trainer, s, s, final=False)
                    every.append(time.perf_counter() - t0)
                else:
                    never.append(time.perf_counter() - t0)
            engine.drain()
            return statistics.median(never[5:]), statistics.median(every[5:])
        finally:
            ray.shutdown()
            dist.destroy_process_group()


def copy_times(state, d, repeats: int) -> tuple[float, float, float]:
    """Median blocking time of a plain clone, resilient's host copy and torch.save of `state`."""
    plain = median_time(lambda: {k: v.clone() for k, v in state.items()}, repeats)
    ours = median_time(lambda: host_copy(state), repeats)
    sync = median_time(lambda: sync_torch_save(state, d), repeats)
    return plain, ours, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big-gb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    rows = []
    for label, make in (
        ("tiny LoRA", tiny_state),
        (f"{args.big_gb:g} GB", lambda: big_state(args.big_gb)),
    ):
        state = make()
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        print(f"[{label}] {nbytes / 2**20:.1f} MiB in {len(state)} tensors", flush=True)
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
            plain, ours, sync = copy_times(state, d, args.repeats)
            dcp, why = dcp_async_blocking(state, d, min(args.repeats, 3))
            thr, put, durable = persist_vs_put(state, d, min(args.repeats, 3))
        rows.append((label, nbytes, ours, sync, dcp, why, plain, thr, put, durable))
        del state
    print("\nblocking time per checkpoint (median), same state, same local storage")
    print(
        f"{'state':<10} {'resilient':>10} {'torch.save':>10} {'dcp.async':>10} {'a/b':>7} "
        f"{'plain copy':>10} {'a/plain':>7} {'persist MB/s':>12} {'put MB/s':>9} {'ratio':>6} "
        f"{'put+fsync':>9} {'ratio':>6}"
    )
    for label, _nbytes, ours, sync, dcp, why, plain, thr, put, durable in rows:
        d = f"{dcp * 1e3:8.2f}ms" if dcp is not None else f"{'n/a':>10}"
        print(
            f"{label:<10} {ours * 1e3:8.2f}ms {sync * 1e3:8.2f}ms {d} {ours / sync:7.1%} "
            f"{plain * 1e3:8.2f}ms {ours / plain:6.2f}x {thr / 1e6:12.0f} {put / 1e6:9.0f} "
            f"{thr / put:6.1%} {durable / 1e6:9.0f} {thr / durable:6.1%}"
        )
        if why:
            print(f"  dcp.async_save: {why}")
    print(
        "persist = CheckpointStore.commit: every file written to a temp name, fsync'd and renamed, "
        "then the manifest; put = fsspec pipe_file of the same bytes (no fsync); "
        "put+fsync = the same, made durable"
    )
    never, every = step_overhead(args.steps)
    print(
        f"\nstep time, tiny model, 1 rank: never {never * 1e3:.2f} ms, "
        f"snapshot every step {every * 1e3:.2f} ms -> overhead {(every - never) / never:+.1%}"
    )


if __name__ == "__main__":
    main()
