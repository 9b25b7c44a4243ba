"""What each PEFT method costs, side by side in one run, on the quickstart model and corpus: step
time (median, and the ratio to LoRA), trainable parameters, the bytes of a snapshot (adapter plus
AdamW state: what every checkpoint holds) and of the exported adapter, and the eval loss after
training (on held-out text: the same generator with another seed, which the run never saw).

Each method trains the quickstart job's global batch (8 samples of 64 tokens) for --steps steps in
one process (a world of one: gloo on CPU, nccl on CUDA).
Usage: python bench/peft_methods.py [--steps 60] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from precision import world_of_one  # noqa: E402

from resilient.config import validate_tree  # noqa: E402
from resilient.training.adapter_io import write_adapter  # noqa: E402
from resilient.training.corpus import write_corpus  # noqa: E402
from resilient.training.data import BYTE_VOCAB, ByteTokenizer, StagedData  # noqa: E402
from resilient.training.model import build_tiny_llama, load_base, trainable_state  # noqa: E402
from resilient.training.prep import prepare  # noqa: E402
from resilient.training.trainer import Trainer  # noqa: E402

QV = {"target_modules": ["q_proj", "v_proj"]}
METHODS = {  # name: (peft table, train keys); the spec keys the README's methods table shows
    "lora": ({"method": "lora", "r": 4, "lora_alpha": 8, **QV}, {}),
    "lora + LoRA+ (16)": (
        {"method": "lora", "r": 4, "lora_alpha": 8, **QV},
        {"loraplus_lr_ratio": 16},
    ),
    "dora": ({"method": "lora", "r": 4, "lora_alpha": 8, "use_dora": True, **QV}, {}),
    "loha": ({"method": "loha", "r": 4, **QV}, {}),
    "lokr": ({"method": "lokr", "r": 4, **QV}, {}),
    "ia3": (
        {
            "method": "ia3",
            "target_modules": ["k_proj", "v_proj", "down_proj"],
            "feedforward_modules": ["down_proj"],
        },
        {},
    ),
    "prefix_tuning": ({"method": "prefix_tuning", "num_virtual_tokens": 8}, {}),
    "prompt_tuning": ({"method": "prompt_tuning", "num_virtual_tokens": 8}, {}),
    "p_tuning": ({"method": "p_tuning", "num_virtual_tokens": 8, "encoder_hidden_size": 32}, {}),
}


def quickstart_work(work: str) -> torch.Tensor:
    """The quickstart corpus and base model in `work`; held-out eval samples (another seed)."""
    write_corpus(f"{work}/c.txt")
    build_tiny_llama(f"{work}/base", BYTE_VOCAB)
    write_corpus(f"{work}/eval.txt", lines=400, seed=1)
    spec = validate_tree({"name": "eval", "data": {"path": f"{work}/eval.txt", "seq_len": 64}})
    prepare(spec, ByteTokenizer(), f"{work}/eval-data", f"{work}/eval-tmp")
    rows = StagedData(f"{work}/eval-data").train
    return torch.stack(
        [torch.from_numpy(rows.get("input_ids", i).astype("int64")) for i in range(128)]
    )


def trainer(work: str, device, peft: dict, train: dict, steps: int) -> Trainer:
    """The quickstart job's spec with this adapter, as one rank of the same global batch."""
    spec = validate_tree(
        {
            "name": "bench",
            "cluster": {"num_workers": 1},
            "model": {"builtin": "tiny-llama"},
            "peft": peft,
            "data": {"path": f"{work}/c.txt", "seq_len": 64},
            "train": {"steps": steps, "batch_size": 8, "lr": 1e-3, "seed": 7, **train},
            "checkpoint": {"storage": f"{work}/runs"},
        }
    )
    t = Trainer(spec, 0, 1, f"{work}/base", device)
    t.setup()
    return t


@torch.no_grad()
def eval_loss(model, samples: torch.Tensor, device) -> float:
    """Mean loss over `samples`, in eval mode (no dropout), batches of 16."""
    model.eval()
    losses = [
        float(model(input_ids=b.to(device), labels=b.to(device)).loss) for b in samples.split(16)
    ]
    model.train()
    return sum(losses) / len(losses)


def measure(work: str, device, evals, peft: dict, train: dict, steps: int) -> dict:
    t = trainer(work, device, peft, train, steps)
    times = [t.step(s).step_time for s in range(1, steps + 1)]
    snap = t.snapshot(steps, steps, "bench")
    with tempfile.TemporaryDirectory() as out:
        write_adapter(t.model, out, f"{work}/base")
        exported = os.path.getsize(f"{out}/adapter_model.safetensors")
    return {
        "ms_per_step": statistics.median(times[3:]) * 1e3,
        "trainable": sum(v.numel() for v in trainable_state(t.model).values()),
        "snapshot_bytes": sum(v.numel() * v.element_size() for v in snap.shared.values()),
        "adapter_bytes": exported,
        "eval_loss": eval_loss(t.model, evals, device),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    device = world_of_one()
    rows = {}
    with tempfile.TemporaryDirectory() as work:
        evals = quickstart_work(work)
        base_loss = eval_loss(load_base(f"{work}/base").to(device), evals, device)
        for name, (peft, train) in METHODS.items():
            rows[name] = measure(work, device, evals, peft, train, args.steps)
    dist.destroy_process_group()
    if args.json:
        print(json.dumps({"base_eval_loss": base_loss, "methods": rows}, indent=2))
        return
    lora = rows["lora"]["ms_per_step"]
    print(f"device: {device}; {args.steps} steps of 8 x 64 tokens")
    print(f"eval loss of the base model without an adapter: {base_loss:.4f}")
    head = (
        f"{'method':20} {'ms/step':>8} {'x lora':>7} {'params':>8} {'snapshot':>10} {'adapter':>9}"
    )
    print(f"{head} {'eval loss':>9}")
    for name, r in rows.items():
        print(
            f"{name:20} {r['ms_per_step']:8.1f} {r['ms_per_step'] / lora:7.2f} "
            f"{r['trainable']:8d} {r['snapshot_bytes']:10d} {r['adapter_bytes']:9d} "
            f"{r['eval_loss']:9.4f}"
        )


if __name__ == "__main__":
    main()
