"""Recovery on a real cluster: a lost node and a partition, resilient vs torchrun vs Ray Train.

On tests/cluster/netcluster.py's cluster (root: a head and three 2-CPU worker nodes, each a network
namespace with its own /tmp, joined by a bridge) the three systems train the same workload (the
quickstart model, LoRA r=4, bench/peer_loop.py's loop for the peers) on 2 ranks, one per worker
node, and get the same faults from outside at the same step: `loss` SIGKILLs every process of
the node of a rank that is not rank 0, `cut` takes rank 0's node off the network for `--cut-s`
seconds. Measured per system and fault: recovery (the fault -> the first step of the next life),
steps replayed, and the whole run's wall time; the ratio is each peer's over resilient's.

resilient: 2 warm spares (`cluster.spares = 2`, placed on the third node), checkpoints on S3 over
the bridge, default timeouts. torchrun: one elastic agent per worker node (`--nnodes 1:2
--max-restarts 3`), the c10d rendezvous store on the head (a process of its own, so no worker
node holds it), torch.save checkpoints every `--every` steps to a folder every node mounts, the
same collective timeout as resilient's (`supervisor.collective_timeout`, 120 s). Worker nodes
get an /etc/hosts naming every node (name lookups answer at once, as on a cluster with DNS).
Ray Train: TorchTrainer with FailureConfig(max_failures=3) on the same Ray cluster (its driver on
the head, SPREAD), checkpoints with ray.train.report every `--every` steps to that shared folder.

Usage: sudo python bench/cluster.py [--steps 400] [--at 120] [--faults loss,cut]
       [--systems resilient,torchrun,raytrain] [--json OUT]
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

from bench.harness import SPEC, peer_cfg, read_log, torchrun_cfg, torchrun_cmd  # noqa: E402
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


def restore(c: NetCluster, target: int) -> None:
    """Worker node `target` anew for the next run (a lost node, or a cut one that Ray may have
    declared dead meanwhile)."""
    c.kill_node(target)
    c.start_node(target)


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
    restore(c, target)
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
        c = torchrun_cmd(str(work), tag, f"{ip_of(0)}:{STORE_PORT}", "1:2", 1, elastic=True)
        return c[:-2] + ["--local-addr", ip_of(k)] + c[-2:]

    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.join(HERE, ".."),
           "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "GLOO_SOCKET_IFNAME": "eth0"}  # fmt: skip
    t0 = time.time()
    agents = {k: c.spawn(k, cmd(k), work / f"{tag}-agent{k}.log", env) for k in (1, 2)}
    struck = None
    try:
        struck = _strike(c, cfg["step_log"], kind, a, lambda: [1, 2])
        if struck is None:
            return {"done": False}
        rc = agents[3 - struck[3]].wait(timeout=900)  # the agent on the other node
        return _peer_row(read_log(cfg["step_log"]), *struck[:3], rc, a, t0)
    finally:
        for p in [*agents.values(), store]:
            p.kill()
        if struck:
            restore(c, struck[3])


def run_ray_train(c: NetCluster, work: Path, kind: str, a) -> dict:
    """TorchTrainer with FailureConfig(max_failures=3), its driver on the head, its 2 workers
    spread over the worker nodes (SPREAD), checkpoints to a folder every node mounts."""
    tag = f"rt-{kind}"
    cfg = peer_cfg(
        str(work), tag, [], a, a.every, storage=f"{work}/{tag}/storage", address=c.head,
        ifname="eth0",
    )  # fmt: skip
    cmd = [sys.executable, os.path.join(HERE, "ray_train_loop.py"), f"{work}/{tag}/cfg.json"]
    t0 = time.time()
    driver = c.launch_cmd(cmd, work / f"{tag}.log")
    struck = None
    try:
        nodes = lambda: [k for k in range(1, c.workers + 1) if _runs(c, k, "TrainWorker")]  # noqa: E731
        struck = _strike(c, cfg["step_log"], kind, a, nodes)
        if struck is None:
            return {"done": False}
        rc = driver.wait(timeout=900)
        return _peer_row(read_log(cfg["step_log"]), *struck[:3], rc, a, t0)
    finally:
        driver.kill()
        if struck:
            restore(c, struck[3])


def _strike(c: NetCluster, log: str, kind: str, a, rank_nodes) -> tuple | None:
    """Once rank 0's step log reaches `a.at`: cut rank 0's node, or lose another node of
    `rank_nodes()`; (fault time, rank 0's pid, the step then, the node struck), None if the log
    never got there."""
    if not wait_for(lambda: (read_log(log) or [(0,)])[-1][0] >= a.at, 600, "", fail=False):
        return None
    pid0 = int(read_log(log)[-1][3])
    rank0 = int(c.ns_of(pid0)[len(NS) :])
    target = rank0 if kind == "cut" else [k for k in rank_nodes() if k != rank0][0]
    at = read_log(log)[-1][0]
    return fault(c, kind, target, a.cut_s), pid0, at, target


def _runs(c: NetCluster, k: int, name: str) -> bool:
    """Whether a process of node `k` has `name` in its command line (Ray names its workers)."""
    for pid in c.pids(k):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_text():
                return True
        except OSError:
            continue
    return False


def _peer_row(steps: list, t_fault: float, pid0: int, at: int, rc: int, a, t0: float) -> dict:
    """A peer's row from rank 0's step log: recovery = the fault -> the first step of a new life
    (or, where the old processes went on after the link came back, the second step past the one
    at the fault: the first may have been under way), steps replayed = the step at the fault -
    that step + 1."""
    after = [(s, t) for s, t, _, life in steps if t > t_fault and (life != str(pid0) or s > at + 1)]
    return {
        "done": rc == 0 and bool(steps) and steps[-1][0] == a.steps,
        "recovery_s": after[0][1] - t_fault if after else None,
        "steps_replayed": max(0, at - after[0][0] + 1) if after else None,
        "wall_s": time.time() - t0,
    }


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
    ap.add_argument("--systems", default="resilient,torchrun,raytrain")
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
    runners = {"resilient": run_resilient, "torchrun": run_torchrun, "raytrain": run_ray_train}
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
