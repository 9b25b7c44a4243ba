"""GPU-ready training keys, measured side by side in one run: what model.dtype, gradient
checkpointing and gradient accumulation cost per step, and (on a GPU) what a snapshot stalls.

Each configuration trains the same tiny LoRA job for the same number of steps in one process (a
world of one, gloo on CPU, nccl on CUDA); rows are step time (median, ms) and the ratio to float32,
tokens/s, and the loss after the last step (all configurations see the same samples, so the losses
should agree closely). With CUDA it also measures the blocking time of a snapshot of a ~1 GB state:
resilient's pinned side-stream copy vs a plain `.cpu()` copy.
Usage: python bench/precision.py [--steps 40] [--seq-len 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from resilient.config import validate_tree  # noqa: E402
from resilient.training.corpus import write_corpus  # noqa: E402
from resilient.training.data import BYTE_VOCAB  # noqa: E402
from resilient.training.model import build_tiny_llama  # noqa: E402
from resilient.training.trainer import Trainer  # noqa: E402

CONFIGS = [
    ("float32", {}),
    ("bfloat16 autocast", {"model": {"dtype": "bfloat16"}}),
    ("float32 + gradient checkpointing", {"train": {"gradient_checkpointing": True}}),
    (
        "bfloat16 + checkpointing + accum 2 (half batch)",
        {"model": {"dtype": "bfloat16"}, "train": {"gradient_checkpointing": True}},
    ),
]


def run(work: str, device: torch.device, over: dict, steps: int, seq_len: int, batch: int):
    tree = {
        "name": "bench",
        "model": {"builtin": "tiny-llama"},
        "data": {"path": f"{work}/c.txt", "seq_len": seq_len},
        "train": {"batch_size": batch, "steps": steps, "seed": 7, "lr_scheduler": "cosine"},
        "checkpoint": {"storage": f"{work}/runs"},
    }
    for k, v in over.items():
        tree.setdefault(k, {}).update(v)
    spec = validate_tree(tree)
    trainer = Trainer(spec, 0, 1, f"{work}/base", device)
    trainer.setup()
    times, tokens, loss = [], 0, None
    for s in range(1, steps + 1):
        r = trainer.step(s)
        times.append(r.step_time)
        tokens, loss = r.tokens, r.mean_loss
    return statistics.median(times[3:]), tokens, loss


def snapshot_stall(device: torch.device, gb: float = 1.0) -> tuple[float, float]:
    from resilient.checkpoint.snapshot import host_copy

    n = 16
    state = {f"w{i}": torch.randn(int(gb * 2**30 / 4 / n), device=device) for i in range(n)}
    host_copy(state)  # warm the caching host allocator
    t0 = time.perf_counter()
    host_copy(state)
    pinned = time.perf_counter() - t0
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    {k: v.cpu() for k, v in state.items()}
    plain = time.perf_counter() - t0
    return pinned, plain


def world_of_one() -> torch.device:
    """Start a one-rank process group (nccl on CUDA, gloo on CPU); the device to train on."""
    cuda = torch.cuda.is_available()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{29500 + os.getpid() % 1000}",
        rank=0,
        world_size=1,
    )
    return torch.device("cuda", 0) if cuda else torch.device("cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    device = world_of_one()
    cuda = device.type == "cuda"
    rows = []
    with tempfile.TemporaryDirectory() as work:
        write_corpus(f"{work}/c.txt", 2000)
        build_tiny_llama(f"{work}/base", BYTE_VOCAB)
        for label, over in CONFIGS:
            if "accum 2" in label:  # the same global batch as two microbatches of half the size
                over = {**over, "train": {**over["train"], "grad_accum_steps": 2}}
                step_s, tokens, loss = run(
                    work, device, over, args.steps, args.seq_len, args.batch // 2
                )
            else:
                step_s, tokens, loss = run(work, device, over, args.steps, args.seq_len, args.batch)
            rows.append((label, step_s, tokens / step_s, loss))
    dist.destroy_process_group()
    base = rows[0][1]
    print(f"device: {device}; {args.steps} steps, seq_len {args.seq_len}, batch {args.batch}")
    print(f"{'configuration':50} {'ms/step':>8} {'x fp32':>7} {'tok/s':>9} {'last loss':>10}")
    for label, step_s, tps, loss in rows:
        print(f"{label:50} {step_s * 1e3:8.1f} {step_s / base:7.2f} {tps:9.0f} {loss:10.4f}")
    if cuda:
        pinned, plain = snapshot_stall(device)
        print(f"1 GB snapshot stall: pinned side-stream {pinned:.3f}s, plain .cpu() {plain:.3f}s")


if __name__ == "__main__":
    main()
