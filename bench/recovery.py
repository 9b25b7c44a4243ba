"""Recovery benchmark: resilient vs Ray Train (TorchTrainer) vs torchrun, side by side.

In one invocation, on the same workload and the same faults: Ray Train is TorchTrainer with a
FailureConfig, torchrun runs with --max-restarts.

Workload: DDP over gloo, 2 workers on CPU, the built-in tiny Llama with LoRA (resilient's own
Trainer, so every system trains the same model on the same batches). Fault schedules, each fired
once by the rank's own process: `kill` (SIGKILL of rank 1 at two fixed steps), `mtbf` (SIGKILLs at
seeded exponential training-time arrivals) and `hang` (SIGSTOP of rank 1). Per system: start
(launch -> first step), recovery time (fault -> next finished step), steps replayed, goodput (steps
x median step time / wall time from the first to the last step), hang detection time, and the
no-fault step time vs plain torchrun DDP (no checkpoints). Peers checkpoint every `--every` steps
with torch.save (the loop a user writes).
Usage: python bench/recovery.py [--steps 240] [--quick] [--systems resilient,ray,torchrun]
                                [--cases none,kill,mtbf,hang[,survivors,nodeloss]]
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
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(
    cmd: list[str], timeout: float, env: dict | None = None, log: str | None = None
) -> tuple[int, float]:
    t0 = time.time()
    out = open(log, "w") if log else subprocess.DEVNULL
    p = subprocess.Popen(
        cmd,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env or {})},
    )
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = 124
    return rc, time.time() - t0


def read_log(path: str) -> list[tuple[int, float, float, str]]:
    """Rank 0's finished steps: (step, unix time, step seconds, life).

    life = the process that ran it.
    """
    if not os.path.exists(path):
        return []
    return [
        (int(a), float(b), float(c), d)
        for a, b, c, d in (line.split() for line in open(path) if line.strip())
    ]


def markers(d: str) -> list[dict]:
    if not os.path.isdir(d):
        return []
    return sorted(
        (json.load(open(os.path.join(d, n))) for n in os.listdir(d) if n.startswith("fired-")),
        key=lambda m: m["t"],
    )


def analyse(log: list, faults: list[dict], total: int) -> dict:
    """Per fault: recovery = fault -> the first step finished by the next life (a rank-0 step that
    was already under way when the fault fired does not count), steps replayed = fault step - that
    step. step_s = median wall time between consecutive steps of one life (so whatever a system
    does between steps, checkpoints included, is in it); goodput = steps x step_s / wall time from
    the first step to the last (main() recomputes it with the system's no-fault step_s)."""
    out = {"recovery": [], "replayed": [], "done": bool(log) and log[-1][0] == total}
    if not log:
        return {**out, "goodput": None, "step_s": None}
    for f in faults:
        before = [life for _, t, _, life in log if t <= f["t"]]
        after = [
            (s, t) for s, t, _, life in log if t > f["t"] and (not before or life != before[-1])
        ]
        if after:
            out["recovery"].append(after[0][1] - f["t"])
            out["replayed"].append(max(0, f["step"] - after[0][0]))
    pairs = [
        (a[0], b[1] - a[1])
        for a, b in zip(log, log[1:], strict=False)
        if b[3] == a[3] and b[0] == a[0] + 1
    ]
    gaps = [g for _, g in pairs]
    step_s = statistics.median(gaps) if gaps else statistics.median(d for _, _, d, _ in log)
    late = [g for s, g in pairs if s > total // 2]
    out["steady_s"] = (
        statistics.median(late) if late else step_s
    )  # second half: one-time warm-ups are over
    wall = log[-1][1] - log[0][1] + step_s
    out.update(
        step_s=step_s, span=wall, goodput=min(1.0, total * step_s / wall) if out["done"] else None
    )
    return out


# -- the three systems -----------------------------------------------------------------------------
SPEC = """name = "{name}"
[cluster]
num_workers = 2
[peft]
method = "lora"
r = 4
lora_alpha = 8
target_modules = ["q_proj", "v_proj"]
[data]
path = "{work}/corpus.txt"
seq_len = {seq_len}
[train]
steps = {steps}
batch_size = {batch}
seed = 7
[checkpoint]
storage = "{work}/runs"
every = 1
[supervisor]
heartbeat_interval = 0.5
hang_timeout = {hang}
"""


def run_resilient(work: str, case: str, schedule: list[dict], a, sets=()) -> dict:
    """`sets`: spec overrides (`--set KEY=VALUE`) for this run."""
    name = f"res-{case}"
    spec = SPEC.format(
        name=name, work=work, steps=a.steps, seq_len=a.seq_len, batch=a.batch, hang=a.hang_timeout
    )
    for f in schedule:
        trig = f"at_step = {f['at_step']}" if "at_step" in f else f"at_time = {f['at_time']}"
        spec += f'\n[[chaos]]\n{trig}\nfault = "{f["fault"]}"\nrank = {f["rank"]}\n'
    path = f"{work}/{name}.toml"
    open(path, "w").write(spec)
    overrides = [x for kv in sets for x in ("--set", kv)]
    t_launch = time.time()
    rc, wall = sh(
        [sys.executable, "-m", "resilient.cli", "launch", path, "--run-id", "r", *overrides],
        a.limit,
        log=f"{work}/{name}.log",
    )
    run = f"{work}/runs/{name}/r"
    import pyarrow.parquet as pq

    rows = (
        pq.read_table(f"{run}/metrics/train").to_pylist()
        if os.path.isdir(f"{run}/metrics/train")
        else []
    )
    # every time rank 0 finished a step (replays included); a life is one attempt of the group
    log = sorted(
        (
            (r["step"], r["t"], r["step_time"] + r["data_wait"], str(r["attempt"]))
            for r in rows
            if r["rank"] == 0
        ),
        key=lambda x: x[1],
    )
    from resilient.rundir import RunDir, markers

    fired = [
        {"fault": m.fault, "step": m.step, "t": m.injected_at}
        for m in markers.read_all(RunDir(run))
    ]
    res = analyse(log, fired, a.steps)
    res["start_s"] = log[0][1] - t_launch if log else None
    res["done"] = rc == 0 and res["done"]
    if not res["done"]:
        res["goodput"] = None
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "resilient.cli", "status", run, "--json"],
            capture_output=True,
            text=True,
        ).stdout
        or "{}"
    )
    hangs = [f for f in status.get("faults", []) if f["kind"] == "hang" and f.get("injected_at")]
    res["hang_detect"] = hangs[0]["detected_at"] - hangs[0]["injected_at"] if hangs else None
    return res


def torchrun_cfg(work: str, tag: str, schedule: list[dict], a, every: int) -> dict:
    """The config a torchrun rank of peer_loop.py reads, written to `<work>/<tag>/cfg.json`."""
    cfg = {
        "work": work,
        "base": f"{work}/base",
        "steps": a.steps,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "every": every,
        "ckpt_dir": f"{work}/{tag}/ckpt",
        "marker_dir": f"{work}/{tag}/markers",
        "step_log": f"{work}/{tag}/steps.log",
        "faults": schedule,
        "collective_timeout": a.collective_timeout,
    }
    os.makedirs(f"{work}/{tag}", exist_ok=True)
    json.dump(cfg, open(f"{work}/{tag}/cfg.json", "w"))
    return cfg


def run_torchrun(work: str, case: str, schedule: list[dict], a, every: int | None = None) -> dict:
    tag = f"tr-{case}"
    cfg = torchrun_cfg(work, tag, schedule, a, a.every if every is None else every)
    port = free_port()
    t_launch = time.time()
    rc, wall = sh(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "1",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "3",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            os.path.join(HERE, "peer_loop.py"),
            f"{work}/{tag}/cfg.json",
        ],
        a.limit,
        env={"PYTHONPATH": os.path.join(HERE, "..")},
        log=f"{work}/{tag}.log",
    )
    log = read_log(cfg["step_log"])
    res = analyse(log, markers(cfg["marker_dir"]), a.steps)
    res["start_s"] = log[0][1] - t_launch if log else None
    res["done"] = rc == 0 and res["done"]
    if not res["done"]:
        res["goodput"] = None
    return res


def run_ray_train(work: str, case: str, schedule: list[dict], a) -> dict:
    tag = f"rt-{case}"
    cfg = {
        "work": work,
        "base": f"{work}/base",
        "steps": a.steps,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "every": a.every,
        "marker_dir": f"{work}/{tag}/markers",
        "step_log": f"{work}/{tag}/steps.log",
        "faults": schedule,
        "storage": f"{work}/{tag}/storage",
        "collective_timeout": a.collective_timeout,
    }
    os.makedirs(f"{work}/{tag}", exist_ok=True)
    json.dump(cfg, open(f"{work}/{tag}/cfg.json", "w"))
    t_launch = time.time()
    rc, wall = sh(
        [
            sys.executable,
            os.path.join(HERE, "recovery.py"),
            "--_ray-train",
            f"{work}/{tag}/cfg.json",
        ],
        a.limit,
        env={"PYTHONPATH": os.path.join(HERE, "..")},
        log=f"{work}/{tag}.log",
    )
    log = read_log(cfg["step_log"])
    res = analyse(log, markers(cfg["marker_dir"]), a.steps)
    res["start_s"] = log[0][1] - t_launch if log else None
    res["done"] = rc == 0 and res["done"]
    if not res["done"]:
        res["goodput"] = None
    return res


def ray_train_driver(cfg_path: str) -> None:
    """Internal: the Ray Train job (a driver of its own, like a user's script)."""
    import ray
    from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = json.load(open(cfg_path))

    def loop(cfg):
        import tempfile

        import ray.train
        import torch
        import torch.distributed as dist

        from bench.peer_loop import Faults, apply_state, make_spec, run, state_of
        from resilient.training.trainer import Trainer

        rank, world = (
            ray.train.get_context().get_world_rank(),
            ray.train.get_context().get_world_size(),
        )
        torch.set_num_threads(1)
        trainer = Trainer(
            make_spec(cfg["work"], cfg["steps"], cfg["seq_len"], cfg["batch"]),
            rank,
            world,
            cfg["base"],
            torch.device("cpu"),
        )
        trainer.setup()
        start = 0
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                state = torch.load(os.path.join(d, "state.pt"), weights_only=False)
            apply_state(trainer, state)
            start = state["step"]

        def after(step):
            if step % cfg["every"]:
                return
            with tempfile.TemporaryDirectory() as d:
                if rank == 0:
                    torch.save(state_of(trainer, step), os.path.join(d, "state.pt"))
                ray.train.report(
                    {"step": step}, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None
                )
            dist.barrier()

        faults = Faults(cfg["faults"], rank, cfg["marker_dir"]) if cfg["faults"] else None
        run(trainer, rank, start, cfg["steps"], faults, cfg["step_log"], after)

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "GLOO_SOCKET_IFNAME": "lo",
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.path.join(HERE, ".."),
            }
        },
    )
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            storage_path=cfg["storage"],
            name="bench",
            failure_config=FailureConfig(max_failures=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    ray.shutdown()


# -- the table -------------------------------------------------------------------------------------
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
    ap.add_argument("--_ray-train", dest="ray_train", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ray_train:
        return ray_train_driver(a.ray_train)
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
    plain = run_torchrun(work, "plain", [], a, every=0)
    print(f"plain torchrun DDP (no checkpoints): {plain['step_s'] * 1e3:.1f} ms/step", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for case, schedule in cases.items():
        for sysname, fn in systems.items():
            t_run = time.time()
            res = fn(work, case, schedule, a)
            results.setdefault(sysname, {})[case] = res
            print(
                f"  {case:<5} {sysname:<10} {time.time() - t_run:5.0f}s done={res['done']} "
                f"recovery={fmt(res['recovery'])} "
                f"replayed={res['replayed']} goodput={res['goodput']}",
                flush=True,
            )
    # goodput against the system's own fault-free step: slow steps after a fault count as lost
    for by in results.values():
        ref = by["none"].get("step_s")
        for r in by.values():
            if ref and r.get("goodput") is not None:
                r["goodput"] = min(1.0, a.steps * ref / r["span"])
    print(
        f"\nsame workload (DDP, 2 CPU workers, tiny Llama + LoRA, {a.steps} steps), same faults; "
        f"peers checkpoint every {a.every} steps; wall {time.time() - t0:.0f}s"
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
    if a.json:
        write_json(a.json, {keys[n]: by for n, by in results.items()})
    if "survivors" in asked or "nodeloss" in asked:
        from bench import elastic

        surv = elastic.survivors(work, a) if "survivors" in asked else []
        loss = elastic.node_loss(work, a) if "nodeloss" in asked else []
        elastic.print_tables(surv, loss)
    shutil.rmtree(work, ignore_errors=True)


def write_json(path: str, results: dict[str, dict[str, dict]]) -> None:
    """The table's figures, machine-readable: per system and case, each fault's recovery seconds
    and replayed steps, the goodput (None when the run failed), whether the run finished and the
    seconds from launch to the first step."""
    out = {
        system: {
            case: {
                "recovery_s": list(r.get("recovery", [])),
                "steps_replayed": list(r.get("replayed", [])),
                "goodput": r.get("goodput"),
                "done": bool(r.get("done")),
                "start_s": r.get("start_s"),
            }
            for case, r in by.items()
        }
        for system, by in results.items()
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
