"""Recovery benchmark: resilient vs Ray Train (TorchTrainer) vs torchrun, side by side.

In one invocation, on the same workload and the same faults: Ray Train is TorchTrainer with a
FailureConfig, torchrun runs with --max-restarts.

Workload: DDP over gloo, 2 workers on CPU, the built-in tiny Llama with LoRA (resilient's own
Trainer, so every system trains the same model on the same batches). Fault schedules, each fired
once by the rank's own process: `kill` (SIGKILL of rank 1 at two fixed steps), `mtbf` (SIGKILLs at
seeded exponential training-time arrivals) and `hang` (SIGSTOP of rank 1). Per system: start
(launch -> first step), recovery time (fault -> next finished step), steps replayed, goodput (steps
x median step time / wall time from the first to the last step), hang detection time, and the
no-fault step time vs plain torchrun DDP (no checkpoints), each the median of `--rounds` no-fault
runs that alternate the systems (a machine's speed drifts over minutes; alternating puts the same
drift under each), with two figures the drift moves less: the steady step over plain DDP's paired
by round, and each system's fastest stretch of 40 steps (interference only adds time). Peers
checkpoint every `--every` steps with torch.save (the loop a user writes).
Usage: python bench/recovery.py [--steps 240] [--quick] [--systems resilient,ray,torchrun]
                                [--cases none,kill,mtbf,hang[,survivors,nodeloss]]
                                [--rounds 3] [--set KEY=VALUE ...] (resilient's spec overrides)
The elastic cases (bench/elastic.py; not in the default) add two tables: what keeping the
survivors saves (resilient with and without it, with and without warm spares), and a node lost
with and without spare capacity (resilient vs torchrun's elastic agents, --nnodes 1:2).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench.harness import WINDOW, run_ray_train, run_resilient, run_torchrun  # noqa: E402


# -- the table -------------------------------------------------------------------------------------
def over_rounds(runs: list[dict]) -> dict:
    """One system's no-fault runs as one: the first run (its span and goodput), with the median of
    the rounds' step_s and steady_s (each round's kept in `rounds_step_s` and `rounds_steady_s`)
    and the fastest of their `best_s`."""
    out = dict(runs[0])
    for key in ("step_s", "steady_s"):
        got = [r[key] for r in runs if r.get(key)]
        out[key] = statistics.median(got) if got else None
        out[f"rounds_{key}"] = got
    best = [r["best_s"] for r in runs if r.get("best_s")]
    out["best_s"] = min(best) if best else None  # the fastest stretch of any round
    out["done"] = all(r["done"] for r in runs)
    return out


def paired(runs: list[dict], plains: list[dict], key: str = "steady_s") -> dict | None:
    """A system's `key` over plain DDP's, paired by round (the two ran minutes apart, not the
    whole bench apart): the median ratio - 1 and its range over the rounds. The drift between
    rounds falls out of each pair; what is left is the noise within a round, which torchrun's pair
    shows (its checkpoint steps are not in the median, so it is plain DDP's step: an A/A test)."""
    over = [
        r[key] / p[key] - 1 for r, p in zip(runs, plains, strict=True) if r.get(key) and p.get(key)
    ]
    if not over:
        return None
    return {"median": statistics.median(over), "min": min(over), "max": max(over), "rounds": over}


def fmt(xs, unit="s"):
    xs = [x for x in xs if x is not None]
    return "-" if not xs else "/".join(f"{x:.2f}" for x in xs) + unit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--every", type=int, default=25, help="peers' checkpoint interval in steps")
    ap.add_argument(
        "--mtbf", type=float, default=5.0, help="mean training seconds between faults (mtbf case)"
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang-timeout", type=float, default=5.0)
    ap.add_argument(
        "--collective-timeout", type=float, default=20.0, help="peers notice a hang only through it"
    )
    ap.add_argument(
        "--limit",
        type=float,
        default=100.0,
        help="seconds one run may take (then it counts as failed)",
    )
    ap.add_argument("--quick", action="store_true", help="kill and no-fault cases only")
    ap.add_argument(
        "--systems", default="resilient,ray,torchrun", help="comma list, a subset of the default"
    )
    ap.add_argument(
        "--cases",
        default="none,kill,mtbf,hang",
        help="comma list, a subset of the default, plus survivors and nodeloss (bench/elastic.py)",
    )
    ap.add_argument(
        "--json",
        metavar="OUT",
        help="also write {system: {case: {recovery_s, steps_replayed, goodput, done, start_s}}} "
        "to OUT "
        "(systems by their --systems names)",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="no-fault runs of each system, alternated; the step times are their medians",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a spec override for resilient's runs (repeatable), e.g. to see what a feature "
        "costs per step: --set checkpoint.audit_every=0",
    )
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    from resilient.training.corpus import write_corpus
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    work = tempfile.mkdtemp(prefix="resilient-bench-")
    write_corpus(f"{work}/corpus.txt")
    build_tiny_llama(f"{work}/base", BYTE_VOCAB)
    r = random.Random(a.seed)
    t, mtbf = 0.0, []
    while len(mtbf) < 3:
        t += r.expovariate(1 / a.mtbf)
        mtbf.append({"fault": "kill", "rank": r.randrange(2), "at_time": round(t, 2)})
    cases = {
        "none": [],
        "kill": [
            {"fault": "kill", "rank": 1, "at_step": a.steps // 3},
            {"fault": "kill", "rank": 1, "at_step": 2 * a.steps // 3},
        ],
    }
    if not a.quick:
        cases.update(mtbf=mtbf, hang=[{"fault": "hang", "rank": 1, "at_step": a.steps // 2}])
    asked = a.cases.split(",")
    cases = {k: v for k, v in cases.items() if k in asked or k == "none"}
    keys = {"resilient": "resilient", "Ray Train": "ray", "torchrun": "torchrun"}
    systems = {
        n: fn
        for n, fn, key in (
            ("resilient", run_resilient, "resilient"),
            ("Ray Train", run_ray_train, "ray"),
            ("torchrun", run_torchrun, "torchrun"),
        )
        if key in a.systems.split(",")
    }
    t0 = time.time()
    results: dict[str, dict[str, dict]] = {}

    def run(case: str, sysname: str, fn, tag: str) -> dict:
        t_run = time.time()
        sets = {"sets": a.set} if fn is run_resilient else {}
        res = fn(work, tag, cases[case], a, **sets)
        print(
            f"  {tag:<8} {sysname:<10} {time.time() - t_run:5.0f}s done={res['done']} "
            f"recovery={fmt(res['recovery'])} "
            f"replayed={res['replayed']} goodput={res['goodput']}",
            flush=True,
        )
        return res

    # The no-fault step, in rounds that alternate the systems (plain DDP included): on a shared or
    # throttled machine the speed drifts by 10-20% over minutes, which one run of each would read
    # as one system's overhead; each system's median over the rounds sees the same drift.
    # Odd rounds run in the reverse order: a drift within a round falls on each system alike.
    plains, nofault = [], {}
    for i in range(a.rounds):
        order = [("plain", None), *systems.items()]
        for sysname, fn in order[:: -1 if i % 2 else 1]:
            if fn is None:
                plains.append(run_torchrun(work, f"plain{i}", [], a, every=0))
            else:
                nofault.setdefault(sysname, []).append(run("none", sysname, fn, f"none{i}"))
    plain = over_rounds(plains)
    print(f"plain torchrun DDP (no checkpoints): {plain['step_s'] * 1e3:.1f} ms/step", flush=True)
    for sysname, runs in nofault.items():
        results[sysname] = {"none": over_rounds(runs) | {"steady_over_plain": paired(runs, plains)}}
    for case in cases:
        if case != "none":
            for sysname, fn in systems.items():
                results[sysname][case] = run(case, sysname, fn, case)
    # goodput against the system's own fault-free step: slow steps after a fault count as lost
    for by in results.values():
        ref = by["none"].get("step_s")
        for r in by.values():
            if ref and r.get("goodput") is not None:
                r["goodput"] = min(1.0, a.steps * ref / r["span"])
    print(
        f"\nsame workload (DDP, 2 CPU workers, tiny Llama + LoRA, {a.steps} steps), same faults; "
        f"peers checkpoint every {a.every} steps; no-fault step times: the median of {a.rounds} "
        f"alternated rounds; wall {time.time() - t0:.0f}s"
    )
    head = (
        f"{'system':<10} {'start s':>7} {'step ms':>8} {'overhead':>9} {'steady':>7} | "
        f"{'kill: recovery':>16} {'replayed':>9} {'goodput':>8}"
        f" {'@1 fault/min':>12} | {'mtbf: recovery':>22} {'goodput':>8} | "
        f"{'hang: detected':>14} {'recovered':>10}"
    )
    print(head)
    print("-" * len(head))
    for sysname, by in results.items():
        none, kill = by["none"], by.get("kill", {})
        mt, hang = by.get("mtbf", {}), by.get("hang", {})
        over = (
            f"{none['step_s'] / plain['step_s'] - 1:+.1%}"
            if none.get("step_s") and plain.get("step_s")
            else "-"
        )
        steady = (
            f"{none['steady_s'] / plain['steady_s'] - 1:+.1%}"
            if none.get("steady_s") and plain.get("steady_s")
            else "-"
        )
        if sysname == "resilient":
            hd = f"{hang['hang_detect']:.1f}s" if hang.get("hang_detect") else "-"
        else:  # peers have no hang detector: the collective timeout ends the wait, if anything does
            hd = (
                (
                    f">= {a.collective_timeout:.0f}s"
                    if hang.get("recovery")
                    else f"not in {a.limit:.0f}s"
                )
                if hang
                else "-"
            )
        gp = lambda r: f"{r['goodput']:.1%}" if r.get("goodput") else ("FAILED" if r else "-")  # noqa: E731
        # one fault a minute: each costs its recovery plus the replayed steps
        # (kill case, this system's step)
        lost = [
            rec + rep * (none.get("step_s") or 0)
            for rec, rep in zip(kill.get("recovery", []), kill.get("replayed", []), strict=True)
        ]
        per_min = f"{max(0.0, 1 - statistics.mean(lost) / 60):.1%}" if lost else "-"
        print(
            f"{sysname:<10} {none.get('start_s') or float('nan'):7.1f} "
            f"{none['step_s'] * 1e3 if none.get('step_s') else float('nan'):8.1f} "
            f"{over:>9} {steady:>7} | "
            f"{fmt(kill.get('recovery', [])):>16} "
            f"{'/'.join(map(str, kill.get('replayed', []))) or '-':>9} {gp(kill):>8}"
            f" {per_min:>12} | {fmt(mt.get('recovery', [])):>22} {gp(mt):>8} | {hd:>14} "
            f"{fmt(hang.get('recovery', [])):>10}"
        )
    print(
        "start s: launch to the first finished step (no-fault run); "
        "overhead: no-fault wall time per step vs plain torchrun DDP without checkpoints "
        "(steady: over the second half of the run, after one-time warm-ups such as spare workers); "
        "goodput: steps x the system's no-fault step time / wall time from its first step to its "
        "last; @1 fault/min: 1 - (recovery + replayed steps) / 60 s, from the kill case"
    )
    for sysname, by in results.items():
        if pair := by["none"].get("steady_over_plain"):
            print(
                f"{sysname} steady step over plain DDP's in the same round: median "
                f"{pair['median']:+.1%} ({pair['min']:+.1%} to {pair['max']:+.1%}, "
                f"{len(pair['rounds'])} rounds)"
            )
        if by["none"].get("best_s") and plain.get("best_s"):
            print(
                f"{sysname} fastest {WINDOW} steps: {by['none']['best_s'] * 1e3:.1f} ms, "
                f"{by['none']['best_s'] / plain['best_s'] - 1:+.1%} over plain DDP's "
                f"({plain['best_s'] * 1e3:.1f} ms): the step without the machine's interference"
            )
    if a.json:
        write_json(a.json, {keys[n]: by for n, by in results.items()} | {"plain": {"none": plain}})
    if "survivors" in asked or "nodeloss" in asked:
        from bench import elastic

        surv = elastic.survivors(work, a) if "survivors" in asked else []
        loss = elastic.node_loss(work, a) if "nodeloss" in asked else []
        elastic.print_tables(surv, loss)
    shutil.rmtree(work, ignore_errors=True)


def write_json(path: str, results: dict[str, dict[str, dict]]) -> None:
    """The table's figures, machine-readable: per system and case, each fault's recovery seconds
    and replayed steps, the goodput (None when the run failed), whether the run finished, the
    seconds from launch to the first step, and the wall seconds per step (`step_s`: the whole
    run; `steady_s`: its second half; for the no-fault case the medians over `--rounds`, each
    round's in `rounds_step_s` and `rounds_steady_s`, `steady_over_plain`: the steady step over
    plain DDP's paired by round, {median, min, max, rounds}, and `best_s`: the fastest stretch of
    harness.WINDOW steps in any round)."""
    out = {
        system: {
            case: {
                "recovery_s": list(r.get("recovery", [])),
                "steps_replayed": list(r.get("replayed", [])),
                "goodput": r.get("goodput"),
                "done": bool(r.get("done")),
                "start_s": r.get("start_s"),
                "step_s": r.get("step_s"),
                "steady_s": r.get("steady_s"),
            }
            | {
                k: r[k]
                for k in ("rounds_step_s", "rounds_steady_s", "steady_over_plain", "best_s")
                if k in r
            }
            for case, r in by.items()
        }
        for system, by in results.items()
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
