"""Elastic recovery benchmark, the `survivors` and `nodeloss` cases of bench/recovery.py.

`survivors`: rank 1 SIGKILLed twice (the `kill` schedule); resilient with the survivor kept
(`supervisor.keep_survivors`, the default) and with the whole group restarted, each with and
without warm spares. Recovery = fault -> the next step finished; replayed steps.

`nodeloss`: rank 1's node lost at mid-run (its raylet, or its torchrun agent, killed with its rank):
- with spare capacity: resilient on 3 simulated one-CPU nodes (2 ranks), torchrun's elastic agent
  (`--nnodes 1:2`) with a third, standby agent;
- without: resilient on 2 nodes with `cluster.min_workers = 1` (it goes on with one rank, the
  same global batch), torchrun's elastic agents `--nnodes 1:2` on 2 nodes (it re-forms with one).
Neither keeps warm spares here, so capacity is what decides. torchrun's rendezvous is tuned for
speed (`last_call_timeout=1`, keep-alives every second): its defaults wait 30 s before a smaller
round. Reported: recovery, world size after the fault, and wall time from the first step to the
last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from bench.harness import (
    HERE,
    analyse,
    free_port,
    markers,
    read_log,
    run_resilient,
    torchrun_cfg,
    torchrun_cmd,
)

SURVIVORS = [  # (label, --set overrides)
    ("keep, warm spares", []),
    ("restart all, warm spares", ["supervisor.keep_survivors=false"]),
    ("keep, no spares", ["supervisor.warm_spares=false"]),
    ("restart all, no spares", ["supervisor.warm_spares=false", "supervisor.keep_survivors=false"]),
]
ONE_CPU = ["supervisor.warm_spares=false", "cluster.resources_per_worker={CPU = 1}"]


def survivors(work: str, a) -> list[tuple[str, dict]]:
    schedule = [
        {"fault": "kill", "rank": 1, "at_step": a.steps // 3},
        {"fault": "kill", "rank": 1, "at_step": 2 * a.steps // 3},
    ]
    out = []
    for i, (label, sets) in enumerate(SURVIVORS):
        out.append((label, run_resilient(work, f"surv{i}", schedule, a, sets)))
        print(f"  survivors {label:<26} {_brief(out[-1][1])}", flush=True)
    return out


def node_loss(work: str, a) -> list[tuple[str, str, dict]]:
    schedule = [{"fault": "node_loss", "rank": 1, "at_step": a.steps // 2}]
    runs = [
        ("resilient", "spare node", lambda: _resilient(work, "nl3", schedule, a, nodes=3)),
        ("resilient", "none", lambda: _resilient(work, "nl2", schedule, a, nodes=2)),
        ("torchrun elastic", "standby agent", lambda: _elastic(work, "nl3", schedule, a, 3)),
        ("torchrun elastic", "none", lambda: _elastic(work, "nl2", schedule, a, 2)),
    ]
    out = []
    for system, capacity, fn in runs:
        out.append((system, capacity, fn()))
        print(f"  nodeloss  {system:<17} {capacity:<14} {_brief(out[-1][2])}", flush=True)
    return out


def _resilient(work: str, case: str, schedule: list[dict], a, nodes: int) -> dict:
    sets = ONE_CPU + [f"cluster.local_nodes={nodes}", "cluster.min_workers=1"]
    res = run_resilient(work, case, schedule, a, sets)
    status = _status(f"{work}/runs/res-{case}/r")
    res["world_after"] = status.get("world_size")
    return res


def _status(run: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "resilient.cli", "status", run, "--json"],
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out or "{}")


def _elastic(work: str, case: str, schedule: list[dict], a, agents: int) -> dict:
    """torchrun's elastic agents, one per simulated node (`--nproc-per-node 1`), on one c10d
    rendezvous; the run is over when the first agent (the store's host) exits."""
    tag = f"tre-{case}"
    cfg = torchrun_cfg(work, tag, schedule, a, a.every)
    port = free_port()
    cmd = torchrun_cmd(work, tag, f"127.0.0.1:{port}", "1:2", 1, elastic=True)
    env = {
        **os.environ,
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.path.join(HERE, ".."),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    procs = []
    for i in range(agents):
        log = open(f"{work}/{tag}-agent{i}.log", "w")
        procs.append(
            subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        )
        if i == 0:
            time.sleep(1.0)  # the first agent hosts the rendezvous store
    try:
        rc = procs[0].wait(timeout=a.limit)
    except subprocess.TimeoutExpired:
        rc = 124
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    res = analyse(read_log(cfg["step_log"]), markers(cfg["marker_dir"]), a.steps)
    res["done"] = rc == 0 and res["done"]
    worlds = _worlds(cfg["step_log"] + ".world")
    res["world_after"] = worlds[-1] if worlds else None
    return res


def _worlds(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    return [int(line.split()[1]) for line in open(path) if line.strip()]


def _brief(r: dict) -> str:
    rec = "/".join(f"{x:.2f}" for x in r.get("recovery", [])) or "-"
    return f"done={r['done']} recovery={rec}s replayed={r.get('replayed')}"


def print_tables(surv: list, loss: list) -> None:
    if surv:
        print("\nsurvivors kept (resilient, rank 1 SIGKILLed twice)")
        head = f"{'':<26} {'recovery':>12} {'replayed':>9} {'span':>7}"
        print(head + "\n" + "-" * len(head))
        for label, r in surv:
            rec = "/".join(f"{x:.2f}" for x in r["recovery"]) or "-"
            span = f"{r['span']:.1f}s" if r.get("span") and r["done"] else "FAILED"
            replayed = "/".join(map(str, r["replayed"])) or "-"
            print(f"{label:<26} {rec + 's':>12} {replayed:>9} {span:>7}")
    if loss:
        print("\nnode loss (rank 1's node, mid-run)")
        head = (
            f"{'system':<17} {'spare capacity':<14} {'recovery':>9} {'ranks after':>11} {'span':>7}"
        )
        print(head + "\n" + "-" * len(head))
        for system, capacity, r in loss:
            rec = "/".join(f"{x:.2f}" for x in r["recovery"]) or "-"
            span = f"{r['span']:.1f}s" if r.get("span") and r["done"] else "FAILED"
            after = str(r.get("world_after") or "-")
            print(f"{system:<17} {capacity:<14} {rec + 's':>9} {after:>11} {span:>7}")
        print(
            "span: wall time from the first step to the last (a job that shrank trains its last "
            "steps on fewer ranks)"
        )
