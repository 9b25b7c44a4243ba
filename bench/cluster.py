"""Recovery on a real cluster: a lost node and a network partition, resilient vs torchrun.

On tests/cluster/netcluster.py's cluster (root: a head and three 2-CPU worker nodes, each a network
namespace with its own /tmp, joined by a bridge) both systems train the same workload (the
quickstart model, LoRA r=4, bench/peer_loop.py's loop for torchrun) on 2 ranks, one per worker
node, and get the same faults from outside at the same step: `loss` SIGKILLs every process of
the node of a rank that is not rank 0, `cut` takes rank 0's node off the network for `--cut-s`
seconds. Measured per system and fault: recovery (the fault -> the first step of the next life),
steps replayed, and the whole run's wall time; the ratio is torchrun's over resilient's.

resilient: 2 warm spares (`cluster.spares = 2`, placed on the third node), checkpoints on S3 over
the bridge, default timeouts. torchrun: one elastic agent per worker node (`--nnodes 1:2
--max-restarts 3`), the c10d rendezvous store on the head (a process of its own, so no worker
node holds it), torch.save checkpoints every `--every` steps to a folder every node mounts, the
same collective timeout as resilient's (`supervisor.collective_timeout`, 120 s). Worker nodes
get an /etc/hosts naming every node (name lookups answer at once, as on a cluster with DNS).
Ray Train is not in this table yet (see docs/benchmarks.md).

Usage: sudo python bench/cluster.py [--steps 400] [--at 120] [--faults loss,cut] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from bench.recovery import SPEC, read_log, torchrun_cfg  # noqa: E402
from tests.cluster.netcluster import NS, NetCluster, ip_of, wait_for  # noqa: E402

STORE_PORT = 29400
COLLECTIVE_S = 120.0


def spec(work: Path, c: NetCluster, a) -> Path:
    """bench/recovery.py's job (the same workload as peer_loop.py's), on this cluster and S3."""
    text = SPEC.format(
        name="bench", work=work, seq_len=a.seq_len, steps=a.steps, batch=a.batch, hang=10.0
    )
    cluster = f'num_workers = 2\naddress = "{c.head}"\nspares = 2\nplacement_strategy = "SPREAD"'
    text = text.replace("num_workers = 2", cluster).replace(f'"{work}/runs"', '"s3://runs/bench"')
    text = text.split("[supervisor]")[0]  # resilient's default timeouts, as a user has them
    path = work / "bench.toml"
    path.write_text(text.replace("every = 1\n", "every = 1\npersist_every = 20\n"))
    return path


def fault(c: NetCluster, kind: str, target: int, cut_s: float) -> float:
    """Do `kind` to worker node `target`; the time it struck."""
    t = time.time()
    if kind == "loss":
        c.kill_node(target)
    else:
        c.cut(target)
        time.sleep(cut_s)
        c.heal(target)
    return t


def run_resilient(c: NetCluster, work: Path, kind: str, a) -> dict:
    run = f"s3://runs/bench/bench/{kind}"
    t0 = time.time()
    proc = c.launch("launch", str(spec(work, c, a)), "--run-id", kind, log=work / f"r-{kind}.log")
    if not wait_for(lambda: c.status(run).get("step", 0) >= a.at, 600, "", fail=False):
        proc.kill()
        return {"done": False}
    ranks = {r["rank"]: r for r in c.status(run)["ranks"]}
    victim = ranks[1 if kind == "loss" else 0]["pid"]
    target = int(c.ns_of(victim)[len(NS) :])
    t_fault = fault(c, kind, target, a.cut_s)
    rc = proc.wait(timeout=900)
    s = c.status(run)
    if kind == "loss":
        c.start_node(target)
    acted = [f for f in s.get("faults", []) if f.get("recovered_at")]
    if rc or not acted:
        return {"done": False}
    f = acted[0]
    return {
        "done": s["state"] == "SUCCEEDED",
        "recovery_s": f["recovered_at"] - t_fault,
        "detect_s": f["detected_at"] - t_fault,
        "steps_replayed": f["steps_replayed"],
        "wall_s": time.time() - t0,
        "kind": f["kind"],
    }


def _torch_store(c: NetCluster, work: Path) -> subprocess.Popen:
    """The c10d rendezvous store, hosted on the head by a process of its own."""
    code = (
        "import time, datetime, torch.distributed as d; "
        f"s = d.TCPStore('{ip_of(0)}', {STORE_PORT}, None, True, "
        "timeout=datetime.timedelta(seconds=3600), wait_for_workers=False); time.sleep(1e6)"
    )
    return c.spawn(0, [sys.executable, "-c", code], work / "store.log")


def run_torchrun(c: NetCluster, work: Path, kind: str, a) -> dict:
    tag = f"tr-{kind}"
    cfg = torchrun_cfg(str(work), tag, [], a, a.every)
    store = _torch_store(c, work)

    def cmd(k: int) -> list[str]:  # the node's own address (the hostname is the host's here)
        return [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node",
            "1", "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{ip_of(0)}:{STORE_PORT}", "--rdzv-id", tag, "--rdzv-conf",
            "last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=3",
            "--local-addr", ip_of(k), os.path.join(HERE, "peer_loop.py"), f"{work}/{tag}/cfg.json",
        ]  # fmt: skip

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(HERE, ".."),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "GLOO_SOCKET_IFNAME": "eth0"}  # fmt: skip
    t0 = time.time()
    agents = {k: c.spawn(k, cmd(k), work / f"{tag}-agent{k}.log", env) for k in (1, 2)}
    log = cfg["step_log"]
    try:
        if not wait_for(lambda: (read_log(log) or [(0,)])[-1][0] >= a.at, 600, "", fail=False):
            return {"done": False}
        pid0 = int(read_log(log)[-1][3])
        rank0 = int(c.ns_of(pid0)[len(NS) :])
        target = rank0 if kind == "cut" else 3 - rank0
        at = read_log(log)[-1][0]
        t_fault = fault(c, kind, target, a.cut_s)
        survivor = agents[3 - target]
        rc = survivor.wait(timeout=900)
        steps = read_log(log)
        after = [(s, t) for s, t, _, life in steps if t > t_fault and life != str(pid0)]
        return {
            "done": rc == 0 and steps[-1][0] == a.steps,
            "recovery_s": after[0][1] - t_fault if after else None,
            "steps_replayed": max(0, at - after[0][0] + 1) if after else None,
            "wall_s": time.time() - t0,
        }
    finally:
        for p in [*agents.values(), store]:
            p.kill()
        if kind == "loss":
            c.start_node(target)


def table(results: dict) -> str:
    lines = [
        "| fault | system | recovery s | steps replayed | run wall s | vs resilient |",
        "|---|---|---|---|---|---|",
    ]
    for kind, by_sys in results.items():
        base = by_sys.get("resilient", {}).get("recovery_s")
        for name, r in by_sys.items():
            rec = r.get("recovery_s")
            ratio = f"{rec / base:.1f}x" if rec and base else "-"
            cell = f"{rec:.2f}" if rec is not None else "failed"
            wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else "-"
            lines.append(
                f"| {kind} | {name} | {cell} | {r.get('steps_replayed', '-')} | {wall} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--at", type=int, default=120, help="the step the fault strikes at")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--every", type=int, default=20, help="torchrun's checkpoint interval")
    ap.add_argument("--cut-s", type=float, default=20.0, help="how long a partition lasts")
    ap.add_argument("--faults", default="loss,cut")
    ap.add_argument("--systems", default="resilient,torchrun")
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    a.collective_timeout = COLLECTIVE_S
    from resilient.training.corpus import write_corpus
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    # a folder every node mounts (not /tmp, which is each node's own): torchrun's checkpoints
    work = Path(tempfile.mkdtemp(prefix="resilient-cluster-bench-", dir="/var/tmp"))
    write_corpus(str(work / "corpus.txt"))
    build_tiny_llama(str(work / "base"), BYTE_VOCAB)
    runners = {"resilient": run_resilient, "torchrun": run_torchrun}
    results: dict[str, dict[str, dict]] = {}
    try:
        with NetCluster(work / "cluster", workers=3, cpus=2, hosts=True) as c:
            for kind in a.faults.split(","):
                for name in a.systems.split(","):
                    res = runners[name](c, work, kind, a)
                    results.setdefault(kind, {})[name] = res
                    print(f"{kind} {name}: {json.dumps(res)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
