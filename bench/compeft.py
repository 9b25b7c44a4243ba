"""ComPEFT on the quickstart model and corpus: how much smaller the packed adapter is than the
dense one, and what it costs in eval loss, at several densities, in one run.

Trains the quickstart LoRA adapter (r 4 on q_proj/v_proj, 8 x 64 tokens a step) for --steps
steps in one process, then for each density packs the update since the initial adapter exactly as
`resilient ckpt export --compress compeft` does (`training.compeft`), expands it back and measures
the held-out eval loss of the expanded adapter, beside the dense adapter's and the untrained one's.
Sizes are those of the safetensors files (`adapter_model.safetensors` vs `compeft.safetensors`).
The tiny adapter's files are mostly fixed overhead, so the sizes are measured once more on the
shapes of a Llama-2-7B LoRA (r 16 on q_proj/v_proj of 32 layers, float32, random updates: the size
depends on the shapes and the density alone).
Usage: python bench/compeft.py [--steps 60] [--loraplus 0] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from peft_methods import eval_loss, quickstart_work, trainer, world_of_one  # noqa: E402

from resilient.training import compeft  # noqa: E402
from resilient.training.model import adapter_tensors  # noqa: E402

DENSITIES = (0.01, 0.05, 0.1, 0.2, 0.5, 1.0)
PEFT = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def file_size(tensors: dict, work: str) -> int:
    from safetensors.torch import save_file

    path = f"{work}/size.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return os.path.getsize(path)


def at_scale(work: str) -> list[tuple[float, float]]:
    """(density, dense bytes / packed bytes) on a Llama-2-7B LoRA's shapes."""
    g = torch.Generator().manual_seed(0)
    init, dense = {}, {}
    for layer in range(32):
        for proj in ("q_proj", "v_proj"):
            for part, shape in (("lora_A", (16, 4096)), ("lora_B", (4096, 16))):
                name = f"base_model.model.model.layers.{layer}.self_attn.{proj}.{part}.weight"
                init[name] = torch.randn(shape, generator=g) * (0 if part == "lora_B" else 0.01)
                dense[name] = init[name] + torch.randn(shape, generator=g) * 1e-3
    size = file_size(dense, work)
    return [(d, size / file_size(compeft.compress(dense, init, d), work)) for d in DENSITIES]


def cosine(a: dict, b: dict) -> float:
    flat = lambda t: torch.cat([t[k].flatten().float() for k in sorted(t)])  # noqa: E731
    return torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0).item()


def main() -> None:
    from peft import set_peft_model_state_dict

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--loraplus", type=float, default=0, help="train.loraplus_lr_ratio")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    device = world_of_one()
    with tempfile.TemporaryDirectory() as work:
        evals = quickstart_work(work)
        t = trainer(work, device, PEFT, {"loraplus_lr_ratio": args.loraplus}, args.steps)
        init = adapter_tensors(t.model)
        untrained = eval_loss(t.model, evals, device)
        for s in range(1, args.steps + 1):
            t.step(s)
        dense = adapter_tensors(t.model)
        dense_loss, dense_bytes = eval_loss(t.model, evals, device), file_size(dense, work)
        rows = []
        for d in DENSITIES:
            packed = compeft.compress(dense, init, d)
            back = compeft.expand(packed, init)
            set_peft_model_state_dict(t.model, back)
            rows.append(
                {
                    "density": d,
                    "bytes": file_size(packed, work),
                    "ratio": dense_bytes / file_size(packed, work),
                    "cosine": cosine(dense, back),
                    "eval_loss": eval_loss(t.model, evals, device),
                }
            )
        scaled = at_scale(work)
    dist.destroy_process_group()
    if args.json:
        print(
            json.dumps(
                {
                    "dense_bytes": dense_bytes,
                    "dense_loss": dense_loss,
                    "untrained_loss": untrained,
                    "rows": rows,
                    "llama7b_lora_r16_ratio": dict(scaled),
                },
                indent=2,
            )
        )
        return
    print(f"{args.steps} steps, loraplus {args.loraplus:g}; dense adapter {dense_bytes} bytes")
    print(f"eval loss: untrained adapter {untrained:.4f}, dense adapter {dense_loss:.4f}")
    head = f"{'density':>8} {'bytes':>7} {'x smaller':>9} {'cosine':>7} {'eval loss':>9}"
    print(f"{head} {'vs dense':>9}")
    for r in rows:
        print(
            f"{r['density']:8g} {r['bytes']:7d} {r['ratio']:9.1f} {r['cosine']:7.3f} "
            f"{r['eval_loss']:9.4f} {r['eval_loss'] - dense_loss:+9.4f}"
        )
    print(
        "Llama-2-7B LoRA r 16 shapes (33.6 MB dense): "
        + ", ".join(f"density {d:g} {r:.1f}x smaller" for d, r in scaled)
    )


if __name__ == "__main__":
    main()
