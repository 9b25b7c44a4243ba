"""What silent-corruption checks cost: a plain step, a checked step (gradients all-reduced by hand
so a rank's own first-microbatch gradient can be digested, then the state digest all-gathered)
and a checked step with the compute audit (one microbatch recomputed), side by side in one run,
and what that adds up to at the default intervals (`checkpoint.checked` / `audited`).

The acceptance job's shape (built-in tiny Llama + LoRA r=4 on q/v, seq_len 64, batch 4 per rank,
one microbatch per rank per step) as one rank of a world of one (gloo on CPU, nccl on CUDA): the
audit recomputes the rank's own microbatch, which costs what recomputing a peer's does.
Usage: python bench/integrity.py [--steps 200] [--persist-every 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from precision import world_of_one  # noqa: E402

from resilient.config import validate_tree  # noqa: E402
from resilient.training.corpus import write_corpus  # noqa: E402
from resilient.training.data import BYTE_VOCAB  # noqa: E402
from resilient.training.model import build_tiny_llama  # noqa: E402
from resilient.training.trainer import Trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="steps of each kind, interleaved")
    ap.add_argument("--persist-every", type=int, default=10, help="checkpoint.persist_every")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    device = world_of_one()
    with tempfile.TemporaryDirectory() as work:
        write_corpus(f"{work}/c.txt")
        build_tiny_llama(f"{work}/base", BYTE_VOCAB)
        spec = validate_tree(
            {
                "name": "bench",
                "cluster": {"num_workers": 1},
                "model": {"builtin": "tiny-llama"},
                "peft": {
                    "method": "lora",
                    "r": 4,
                    "lora_alpha": 8,
                    "target_modules": ["q_proj", "v_proj"],
                },  # fmt: skip
                "data": {"path": f"{work}/c.txt", "seq_len": 64},
                "train": {"steps": 3 * a.steps + 10, "batch_size": 4, "seed": 7},
                "checkpoint": {"storage": f"{work}/runs", "persist_every": a.persist_every},
            }
        )
        t = Trainer(spec, 0, 1, f"{work}/base", device)
        t.setup()
        for s in range(1, 11):  # warm-up
            t.step(s)
        times: dict[str, list[float]] = {"plain": [], "checked": [], "checked + audit": []}
        kinds = [("plain", False, False), ("checked", True, False), ("checked + audit", True, True)]
        s = 10
        for _ in range(a.steps):  # interleaved: a slow phase of the machine hits all three alike
            for name, check, audit in kinds:
                s += 1
                t0 = time.perf_counter()
                t.step(s, check=check, audit=audit)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    c = spec.checkpoint
    horizon = 100_000
    checks = sum(1 for s in range(1, horizon + 1) if c.checked(s))
    audits = sum(1 for s in range(1, horizon + 1) if c.audited(s, 1.0))
    extra = (checks - audits) * (med["checked"] - med["plain"]) + audits * (
        med["checked + audit"] - med["plain"]
    )
    result = {
        "device": str(device),
        "median_step_ms": {k: round(v * 1e3, 3) for k, v in med.items()},
        "check_interval": horizon // checks,
        "audit_interval": horizon // audits if audits else None,
        "overhead_at_defaults": round(extra / (horizon * med["plain"]), 5),
    }
    if a.json:
        print(json.dumps(result, indent=1))
        return
    print(f"device {result['device']}; median step time (ms): {result['median_step_ms']}")
    print(
        f"defaults (persist_every {a.persist_every}): digests every {result['check_interval']} "
        f"steps, audit every {result['audit_interval']}: "
        f"{100 * result['overhead_at_defaults']:.2f}% of training time"
    )


if __name__ == "__main__":
    main()
