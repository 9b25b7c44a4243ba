"""What resilient's no-fault step costs, part by part, against plain DDP.

bench/recovery.py says how far resilient's step is above plain DDP's; this says where it goes. In
alternated rounds (a machine's speed drifts over minutes: alternating puts the same drift under
each), on bench/recovery.py's workload (2 ranks over gloo, the tiny Llama with LoRA):
- `plain`: plain DDP in two processes, no checkpoints (harness.run_torchrun, every=0);
- `ray`: the same loop with each rank in a Ray actor, training on a thread the actor started (as
  resilient's ranks do), the driver waiting in ray.get, and `--idle` idle actors beside them: what
  hosting the ranks in Ray costs, without any of resilient's work;
- `resilient`: resilient with its defaults (bench/recovery.py's spec);
- each `--variant NAME=KEY=VALUE[;KEY=VALUE...]`: resilient with those spec overrides, e.g.
  `nosnap=checkpoint.every=1000` (no snapshot, hence no persist, digest or audit, but the last).
Reported per system: the fastest stretch of harness.WINDOW steps (interference only adds time)
over the rounds, the steady step over plain DDP's paired by round (median and range), and the CPU
each part of the machine spent per step in the second half (bench.cpu_ledger: the ranks, the
driver, the node agent, the spares, Ray's own processes, the rest): wall time drifts with the
machine; where the CPU beside the ranks goes does not.
Usage: python bench/overhead.py [--rounds 3] [--steps 400] [--idle 3] [--variant ...]
       [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench.cpu_ledger import Ledger  # noqa: E402
from bench.harness import WINDOW, analyse, free_port, run_resilient, run_torchrun  # noqa: E402
from bench.recovery import paired  # noqa: E402


def _train(cfg: dict, rank: int, port: int) -> list:
    """peer_loop's trainer over gloo, world 2: rank 0's log as harness.read_log gives it."""
    import torch.distributed as dist

    from bench.peer_loop import cpu_trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    trainer = cpu_trainer(cfg, rank, 2)
    log = []
    for step in range(1, cfg["steps"] + 1):
        t0 = time.time()
        trainer.step(step)
        log.append((step, time.time(), time.time() - t0, "0"))
    dist.destroy_process_group()
    return log


def run_ray(work: str, a, idle: int) -> dict:
    """The plain loop with its ranks in Ray actors (and `idle` idle actors beside them), on an
    embedded Ray started for this run alone, set up as resilient sets up its own."""
    import ray

    from resilient.launcher.cluster import QUIET

    root = os.path.join(HERE, "..")  # the actors import bench.peer_loop
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}}
    ray.init(
        num_cpus=8,
        include_dashboard=False,
        log_to_driver=False,
        _system_config=QUIET,
        runtime_env=env,
    )

    @ray.remote(num_cpus=1, max_concurrency=2)
    class Rank:
        def run(self, cfg: dict, rank: int, port: int) -> list:
            out: dict = {}

            def body() -> None:
                try:
                    out["log"] = _train(cfg, rank, port)
                except BaseException as e:  # raised to the driver, not lost with the thread
                    out["error"] = e

            t = threading.Thread(target=body)
            t.start()
            t.join()
            if "error" in out:
                raise out["error"]
            return out["log"]

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self) -> int:
            return os.getpid()

    port = free_port()
    cfg = {"work": work, "steps": a.steps, "seq_len": 256, "batch": 8, "base": f"{work}/base"}
    try:
        idlers = [Idle.remote() for _ in range(idle)]
        ray.get([i.ping.remote() for i in idlers])
        ranks = [Rank.remote() for _ in range(2)]
        log = ray.get([r.run.remote(cfg, i, port) for i, r in enumerate(ranks)])[0]
    finally:
        ray.shutdown()
    return analyse(log, [], a.steps)


def per_step(ledger: Ledger, run: dict) -> dict | None:
    """CPU seconds per step in the run's second half (bench.cpu_ledger): {"parts": {part: s},
    "top": [(process, part, s)] for the four processes beside the ranks that took the most}."""
    if not run.get("steady_window") or not run.get("steady_s"):
        return None
    t0, t1 = run["steady_window"]
    steps = (t1 - t0) / run["steady_s"]
    procs = [(cpu / steps, part, proc) for cpu, part, proc in ledger.processes(t0, t1)]
    parts: dict[str, float] = {}
    for cpu, part, _ in procs:
        parts[part] = parts.get(part, 0.0) + cpu
    top = [(proc, part, cpu) for cpu, part, proc in procs if part != "ranks"][:4]
    return {"parts": parts, "top": top}


def cpu_table(runs: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per system: each part's CPU ms per step, the median over the rounds."""
    out = {}
    for name, rs in runs.items():
        got = [r["cpu_per_step_s"]["parts"] for r in rs if r.get("cpu_per_step_s")]
        parts = sorted({p for g in got for p in g})
        out[name] = {p: statistics.median(g.get(p, 0.0) for g in got) * 1e3 for p in parts}
    return out


def summary(runs: dict[str, list[dict]]) -> dict:
    """Per system: the fastest stretch over its rounds and the steady step over plain DDP's in the
    same round (median, min, max)."""
    plain = runs["plain"]
    out = {}
    for name, rs in runs.items():
        best = min((r["best_s"] for r in rs if r.get("best_s")), default=None)
        out[name] = {
            "best_s": best,
            "rounds_best_s": [r.get("best_s") for r in rs],
            "steady_over_plain": paired(rs, plain) if name != "plain" else None,
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--idle", type=int, default=3, help="idle actors beside the `ray` ranks")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[;...]")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    a.seq_len, a.batch, a.hang_timeout, a.limit, a.every = 256, 8, 5.0, 300.0, 25
    a.collective_timeout = 20.0  # as bench/recovery.py's defaults
    variants = {"resilient": []}
    for v in a.variant:
        name, _, sets = v.partition("=")
        if not name or "=" not in sets:
            ap.error(f"--variant {v!r}: NAME=KEY=VALUE[;KEY=VALUE...]")
        variants[name] = sets.split(";")
    from resilient.training.corpus import write_corpus
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    work = tempfile.mkdtemp(prefix="resilient-overhead-")
    write_corpus(f"{work}/corpus.txt")
    build_tiny_llama(f"{work}/base", BYTE_VOCAB)
    os.environ["OMP_NUM_THREADS"] = "1"  # the `ray` ranks' threads, as harness.sh sets the others'
    names = ["plain", "ray", *variants]
    runs: dict[str, list[dict]] = {}
    for i in range(a.rounds):
        for name in names[:: -1 if i % 2 else 1]:
            t0, ledger = time.time(), Ledger()
            if name == "plain":
                r = run_torchrun(work, f"plain{i}", [], a, every=0)
            elif name == "ray":
                r = run_ray(work, a, a.idle)
            else:
                r = run_resilient(work, f"{name}{i}", [], a, sets=variants[name])
            ledger.stop()
            r["cpu_per_step_s"] = per_step(ledger, r)
            runs.setdefault(name, []).append(r)
            print(
                f"round {i} {name:<12} fastest {WINDOW}: {(r.get('best_s') or 0) * 1e3:6.1f} ms "
                f"steady {(r.get('steady_s') or 0) * 1e3:6.1f} ms ({time.time() - t0:.0f}s); CPU "
                "beside the ranks, ms a step: "
                + ", ".join(
                    f"{proc} {s * 1e3:.2f}"
                    for proc, _, s in (r["cpu_per_step_s"] or {}).get("top", [])
                ),
                flush=True,
            )
    out = summary(runs)
    plain = out["plain"]["best_s"]
    for name, s in out.items():
        over = f" {s['best_s'] / plain - 1:+.1%}" if s["best_s"] and plain else ""
        pair = s["steady_over_plain"]
        paired = (
            f"; steady over plain DDP, paired by round: {pair['median']:+.1%} "
            f"({pair['min']:+.1%} to {pair['max']:+.1%})"
            if pair
            else ""
        )
        print(f"{name:<12} fastest {WINDOW} steps {s['best_s'] * 1e3:.1f} ms{over}{paired}")
    cpu = cpu_table(runs)
    print("CPU ms per step in the second half, by part (median over the rounds):")
    for name, parts in cpu.items():
        print(f"{name:<12} " + ", ".join(f"{p} {ms:.2f}" for p, ms in parts.items() if ms >= 0.005))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {"variants": variants, "idle": a.idle, **out, "cpu_ms_per_step": cpu}, f, indent=2
            )


if __name__ == "__main__":
    main()
