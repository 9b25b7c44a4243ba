"""Shared pieces of the side-by-side benchmarks (bench/recovery.py, bench/elastic.py,
bench/cluster.py): running a command with a limit, rank 0's step log and the fault markers, the
analysis of recovery and goodput, and one run of each system (resilient, torchrun, Ray Train) on
the same workload (bench/peer_loop.py's loop for the peers).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
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


WINDOW = 40  # steps in one stretch of `best_s`


def analyse(log: list, faults: list[dict], total: int) -> dict:
    """Per fault: recovery = fault -> the first step finished by the next life (a rank-0 step that
    was already under way when the fault fired does not count), steps replayed = fault step - that
    step. step_s = median wall time between consecutive steps of one life (so whatever a system
    does between steps, checkpoints included, is in it); goodput = steps x step_s / wall time from
    the first step to the last (main() recomputes it with the system's no-fault step_s); steady_s
    = that median over the second half (steady_window: its first and last step's times); best_s =
    the fastest WINDOW steps' median."""
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
    half = [t for s, t, _, _ in log if s > total // 2]
    out["steady_window"] = (half[0], log[-1][1]) if half else None  # when the second half ran
    out["steady_s"] = (
        statistics.median(late) if late else step_s
    )  # second half: one-time warm-ups are over
    # Interference from the rest of a shared machine only ever adds time: the fastest stretch of
    # WINDOW steps (past the first tenth: warm-ups) is the step without it, as timeit's minimum.
    warm = [g for s, g in pairs if s > total // 10]
    wins = [
        statistics.median(warm[i : i + WINDOW]) for i in range(0, len(warm) - WINDOW + 1, WINDOW)
    ]
    out["best_s"] = min(wins) if wins else None
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


def peer_cfg(work: str, tag: str, schedule: list[dict], a, every: int, **extra) -> dict:
    """The config a peer's rank reads (peer_loop.py, ray_train_loop.py), written to
    `<work>/<tag>/cfg.json`."""
    cfg = {
        "work": work,
        "base": f"{work}/base",
        "steps": a.steps,
        "seq_len": a.seq_len,
        "batch": a.batch,
        "every": every,
        "marker_dir": f"{work}/{tag}/markers",
        "step_log": f"{work}/{tag}/steps.log",
        "faults": schedule,
        "collective_timeout": a.collective_timeout,
        **extra,
    }
    os.makedirs(f"{work}/{tag}", exist_ok=True)
    json.dump(cfg, open(f"{work}/{tag}/cfg.json", "w"))
    return cfg


def torchrun_cfg(work: str, tag: str, schedule: list[dict], a, every: int) -> dict:
    """A torchrun rank's config: checkpoints to `<work>/<tag>/ckpt` (torch.save)."""
    return peer_cfg(work, tag, schedule, a, every, ckpt_dir=f"{work}/{tag}/ckpt")


def torchrun_cmd(
    work: str, tag: str, endpoint: str, nnodes: str, nproc: int, elastic: bool = False
) -> list[str]:
    """torchrun over peer_loop.py with `--max-restarts 3` and a c10d rendezvous at `endpoint`;
    `elastic`: one agent per node, its rendezvous tuned for speed (`last_call_timeout=1`,
    keep-alives every second: its defaults wait 30 s before a smaller round)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", nnodes]
    cmd += ["--nproc-per-node", str(nproc), "--max-restarts", "3", "--rdzv-backend", "c10d"]
    cmd += ["--rdzv-endpoint", endpoint]
    if elastic:
        conf = "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3"
        cmd += ["--rdzv-id", tag, "--rdzv-conf", conf]
    return cmd + [os.path.join(HERE, "peer_loop.py"), f"{work}/{tag}/cfg.json"]


def run_peer(cmd: list[str], work: str, tag: str, cfg: dict, a) -> dict:
    """Run a peer's command to its end (`a.limit`) and read its result."""
    t_launch = time.time()
    rc, _ = sh(cmd, a.limit, env={"PYTHONPATH": os.path.join(HERE, "..")}, log=f"{work}/{tag}.log")
    return peer_result(cfg, rc, t_launch, a.steps)


def run_torchrun(work: str, case: str, schedule: list[dict], a, every: int | None = None) -> dict:
    tag = f"tr-{case}"
    cfg = torchrun_cfg(work, tag, schedule, a, a.every if every is None else every)
    cmd = torchrun_cmd(work, tag, f"127.0.0.1:{free_port()}", "1", 2)
    return run_peer(cmd, work, tag, cfg, a)


def peer_result(cfg: dict, rc: int, t_launch: float, total: int) -> dict:
    """A peer's run, from its step log and fault markers (`analyse`), with its start time; not
    done (and no goodput) unless it exited 0 having trained every step."""
    log = read_log(cfg["step_log"])
    res = analyse(log, markers(cfg["marker_dir"]), total)
    res["start_s"] = log[0][1] - t_launch if log else None
    res["done"] = rc == 0 and res["done"]
    if not res["done"]:
        res["goodput"] = None
    return res


def run_ray_train(work: str, case: str, schedule: list[dict], a) -> dict:
    tag = f"rt-{case}"
    cfg = peer_cfg(work, tag, schedule, a, a.every, storage=f"{work}/{tag}/storage")
    cmd = [sys.executable, os.path.join(HERE, "ray_train_loop.py"), f"{work}/{tag}/cfg.json"]
    return run_peer(cmd, work, tag, cfg, a)
