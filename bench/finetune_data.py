"""Fine-tuning data, measured: how fast launch prepares a chat set (rows/s, by tokenizer and
`data.num_proc`), and what packing buys over one sample per padded sequence (step time, samples
and trained tokens per second) on the same chat samples.

The chat set is generated (arithmetic conversations of varied length, a system prompt on a third
of them). Preparation is `training.prep.prepare`, exactly what `resilient launch` runs; training is
one rank (a world of one: gloo on CPU, nccl on CUDA) of the built-in tiny-llama-chat model, the
same global batch of sequences in both layouts.
Usage: python bench/finetune_data.py [--rows 40000] [--steps 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from precision import world_of_one  # noqa: E402

from resilient.config import validate_tree  # noqa: E402
from resilient.training.encode import ByteTokenizer, load_tokenizer  # noqa: E402
from resilient.training.prep import prepare  # noqa: E402
from resilient.training.tiny_chat import CHAT_TEMPLATE, build_tiny_chat_model  # noqa: E402
from resilient.training.trainer import Trainer  # noqa: E402


def chat_set(path: str, rows: int) -> str:
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(rows):
            turns = []
            if r.random() < 0.33:
                turns.append({"role": "system", "content": "You add numbers and say so briefly."})
            for _ in range(r.choice((1, 1, 2, 3))):
                a, b = r.randrange(1000), r.randrange(1000)
                turns += [
                    {"role": "user", "content": f"what is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
                ]
            f.write(json.dumps({"messages": turns}) + "\n")
    return path


def spec_for(data: str, **more) -> object:
    d = {"path": data, "format": "chat", "seq_len": 256, "chat_template": CHAT_TEMPLATE, **more}
    return validate_tree({"name": "bench", "cluster": {"num_workers": 1}, "data": d})


def tokenise(work: str, data: str, base: str) -> list[dict]:
    """Preparation throughput by tokenizer and num_proc."""
    out = []
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(dir=work) as tmp:  # imports and first-call costs, not timed
        prepare(spec_for(data, num_proc=1, packing=True), ByteTokenizer(), f"{tmp}/o", f"{tmp}/c")
    for name, tok in (("byte", ByteTokenizer()), ("bpe", load_tokenizer("", base))):
        for procs in sorted({1, cpus}):
            t0 = time.perf_counter()
            spec = spec_for(data, num_proc=procs, packing=True)
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                stats = prepare(spec, tok, f"{tmp}/out", f"{tmp}/cache")
            wall = time.perf_counter() - t0
            out.append(
                {
                    "tokenizer": name,
                    "num_proc": procs,
                    "rows": stats["rows"],
                    "tokenise_s": stats["tokenise_s"],
                    "rows_per_s": round(stats["rows"] / stats["tokenise_s"]),
                    "prepare_s": round(wall, 2),
                }
            )
            print(out[-1], flush=True)
    return out


def steps(work: str, data: str, base: str, n: int, device) -> list[dict]:
    """Step time of packed vs padded sequences of the same samples."""
    out = []
    for packing in (False, True):
        tree = spec_for(data, packing=packing).model_dump(mode="json")
        tree["model"] = {"path": base}
        tree["train"] |= {"steps": n, "batch_size": 8, "seed": 7}
        tree["checkpoint"] = {"storage": f"{work}/runs"}
        t = Trainer(validate_tree(tree), 0, 1, base, device)
        t.setup()
        times, trained, samples = [], 0, 0
        for s in range(1, n + 1):
            idx = t.order.microbatch(s, 0)
            samples += sum(len(t.data.train.get("lengths", i)) for i in idx)
            trained += sum(int((t.data.train.get("labels", i) != -100).sum()) for i in idx)
            r = t.step(s)
            times.append(r.step_time + r.data_wait)
        wall = sum(times)
        out.append(
            {
                "packing": packing,
                "sequences": len(t.data.train),
                "step_s": round(statistics.median(times), 4),
                "samples_per_s": round(samples / wall, 1),
                "trained_tokens_per_s": round(trained / wall),
            }
        )
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=40_000)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        base = f"{work}/base"
        build_tiny_chat_model(base)
        data = chat_set(f"{work}/chat.jsonl", a.rows)
        prep = tokenise(work, data, base)
        small = chat_set(f"{work}/small.jsonl", 4000)
        device = world_of_one()
        try:
            train = steps(work, small, base, a.steps, device)
        finally:
            dist.destroy_process_group()
    result = {"prepare": prep, "train": train}
    pad, packed = train
    result["packing_speedup_samples"] = round(packed["samples_per_s"] / pad["samples_per_s"], 2)
    print(json.dumps(result) if a.json else result)


if __name__ == "__main__":
    main()
