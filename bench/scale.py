"""Scale by simulation: the control plane's costs at 8 to 1,024 ranks.

Per rank count, in a process of its own: the real `Supervisor` (its Watch, policy, fleet, sizing,
run book, journal, anomaly monitor with its detectors and Parquet metrics writer, node health)
drives a scripted worker group (`agents.scripted`, nodes from `supervisor.scripted_nodes`) on its
fake clock through `--hours` simulated hours of a job: `--nodes-per-8` nodes per 8 ranks (8 ranks a
node) plus `--spare-nodes`, a step every `--step-s`, the default supervisor and checkpoint
settings (heartbeats every second, adaptive hang limits, a snapshot every step). Faults are drawn
at `--rank-mtbf-days` per rank (crash, hang, straggler) and `--node-mtbf-days` per node (node
loss), and one of each kind is placed in every run so each detection latency is measured at every
size. What the scripted group and nodes cost (they stand in for the ranks and the RPCs) is
measured on the supervisor's thread and left out of the driver's CPU.

Reported per rank count (--json OUT: {"<ranks>": {...}}):
- `driver_cpu_per_s`: the driver's CPU seconds (every thread of it) per simulated second;
- `rss_mb`: the driver's peak RSS (`rss_growth_mb`: over its RSS before the job);
- `detect_crash_s`, `detect_hang_s`, `detect_straggler_s`, `detect_node_loss_s`: the longest
  detection latency of that kind, in simulated seconds from the fault to its journalled fault;
- `journal_mb_per_day`, `metrics_mb_per_day` and `objects_per_hour` (files the run directory
  gained), per simulated day or hour;
- `status_fold_2w_s`: `resilient status`'s read and fold of a two-week journal made by repeating
  the simulated one (its records after the first start) to fill 14 days, with the status
  snapshots its journal writes; with `--whole` also `status_whole_fold_2w_s` (the journal read
  and folded whole, as before the snapshots) and the dashboard's `/api/state` on it
  (`api_2w_first_s`: the first request, which reads the journal; `api_2w_s`: the next);
- `faults`, `recovered`, `restarts`, `sim_s`, `wall_s`.
Growth exponents (log cost ratio / log rank ratio, 1 = linear) are printed from 64 to the largest.
Usage: python bench/scale.py [--ranks 8,64,256,1024] [--hours 1] [--step-s 1] [--whole] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

DAY, HOUR = 86400.0, 3600.0
KIND_OF = {"crash": "crash", "hang": "hang", "slow": "straggler", "node_loss": "node_loss"}


class Timed:
    """A stand-in (the scripted group, its nodes) whose methods that stand for the ranks' work or
    an RPC (`TIMED`) have their CPU time on this thread counted apart, so the driver's figure is
    the control plane's alone; lookups (`node_of`, `pending`, ...) cost what they cost."""

    spent = 0.0
    TIMED = frozenset(
        {"poll", "final_heartbeats", "start", "flush_newest", "shutdown", "leave", "replace",
         "write_off", "poll_events", "restore_source", "placement", "capacity", "flush_events"}
    )  # fmt: skip

    def __init__(self, inner):
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name not in Timed.TIMED or not callable(attr):  # a group's `placement` is a list
            return attr

        def call(*a, **kw):
            t0 = time.thread_time()
            try:
                return attr(*a, **kw)
            finally:
                Timed.spent += time.thread_time() - t0

        return call

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)


def plan_faults(args, ranks: int, nodes: list[str], steps: int, rng: random.Random):
    """The faults of one run: drawn at the realistic rates, and one of each kind placed."""
    from resilient.agents.scripted import Scenario

    sc = Scenario(step_s=args.step_s, start_s=args.start_s, heartbeat_s=1.0)
    taken: set[int] = set()

    def at(step: int) -> int:
        while step in taken or step < 30:  # a step strikes once; the first start settles first
            step += 7
        taken.add(step)
        return step

    sim_s = args.hours * HOUR
    n_rank = _poisson(rng, ranks * sim_s / (args.rank_mtbf_days * DAY))
    n_node = _poisson(rng, len(nodes) * sim_s / (args.node_mtbf_days * DAY))
    kinds = ["crash", "crash", "hang", "slow"]
    placed = [("crash", 0.15), ("hang", 0.3), ("slow", 0.45), ("node_loss", 0.6)]
    busy = nodes[: len(nodes) - args.spare_nodes] or nodes  # the nodes the job's ranks are on
    for kind, frac in placed:
        _put(sc, kind, at(int(steps * frac)), rng, ranks, busy)
    for _ in range(n_rank):
        _put(sc, rng.choice(kinds), at(rng.randrange(30, steps)), rng, ranks, busy)
    for _ in range(n_node):
        _put(sc, "node_loss", at(rng.randrange(30, steps)), rng, ranks, busy)
    return sc


def _put(sc, kind: str, step: int, rng, ranks: int, nodes: list[str]) -> None:
    if kind == "node_loss":  # a node once: a lost node's ranks went elsewhere
        left = [n for n in nodes if n not in sc.node_loss.values()]
        if left:
            sc.node_loss[step] = rng.choice(left)
    else:
        getattr(sc, kind)[step] = rng.randrange(ranks)


def _poisson(rng: random.Random, mean: float) -> int:
    n, t = 0, rng.expovariate(1.0)
    while t < mean:
        n, t = n + 1, t + rng.expovariate(1.0)
    return n


def one(args, ranks: int) -> dict:
    """One simulated run at `ranks` ranks (in this process): its figures."""
    from resilient.agents.scripted import FakeClock, ScriptedGroup
    from resilient.anomaly.monitor import AnomalyMonitor
    from resilient.checkpoint.storage import CheckpointStore
    from resilient.config import validate_tree
    from resilient.rundir import RunDir
    from resilient.runlog.journal import Journal, read_records
    from resilient.supervisor.health import NodeHealth
    from resilient.supervisor.parts import Parts
    from resilient.supervisor.scripted_nodes import ScriptedNodes
    from resilient.supervisor.supervisor import Supervisor
    from resilient.training.corpus import write_corpus

    work = tempfile.mkdtemp(prefix=f"scale{ranks}-")
    write_corpus(f"{work}/corpus.txt", lines=50)
    n_nodes = max(1, math.ceil(ranks / 8 * args.nodes_per_8)) + args.spare_nodes
    sim_s = args.hours * HOUR
    steps = int(sim_s / args.step_s)
    spec = validate_tree(
        {
            "name": "scale",
            "data": {"path": f"{work}/corpus.txt"},
            "train": {"steps": steps * 10},  # never done: the run is stopped after --hours
            "cluster": {"num_workers": ranks},
            "checkpoint": {"storage": f"{work}/runs"},
        }
    )
    nodes_list = [f"node{i}" for i in range(n_nodes)]
    sc = plan_faults(args, ranks, nodes_list, steps, random.Random(args.seed))
    sc.every = spec.checkpoint.every
    sc.standby = nodes_list[-args.spare_nodes :] if args.spare_nodes else []
    rundir = RunDir(f"{work}/runs/scale/r")
    journal = Journal(rundir)
    rec = journal.append(
        "job", name="scale", run_id="r", total_steps=spec.train.steps, run_dir=rundir.uri
    )
    clock = FakeClock()
    end = clock() + sim_s
    nodes = ScriptedNodes(
        sc, n_nodes, 8.0 / args.nodes_per_8, spec.checkpoint.every * spec.checkpoint.persist_every
    )
    nodes.num_workers = ranks
    groups: list = []

    def new_group(placement: list[str], attempt: int):
        groups.append(ScriptedGroup(sc, placement, spec.train.steps, clock, attempt))
        return Timed(groups[-1])

    class Control:
        stop_deadline = None
        signalled = False

        @property
        def stop_reason(self):
            return "simulated hours done" if clock() >= end else None

        def end_at_once_while(self, nothing_to_save, record_end):
            pass  # no signals here: the simulated hours end the run

        def close(self):
            pass

    timed_nodes = Timed(nodes)
    parts = Parts(
        CheckpointStore(rundir),
        timed_nodes,
        new_group,
        AnomalyMonitor(spec, rundir),
        Control(),
        clock=clock,
        health=NodeHealth(timed_nodes, prober=nodes.probe),
    )
    files0 = _files(work)
    rss0 = _rss_mb()
    cpu0, wall0, sim0 = time.process_time(), time.time(), clock()
    sup = Supervisor(spec, rundir, journal, parts, [rec])
    if args.profile:  # where the driver's time goes (on stderr)
        import cProfile
        import pstats

        prof = cProfile.Profile()
        status = prof.runcall(sup.run)
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(35)
    else:
        status = sup.run()
    cpu = time.process_time() - cpu0 - Timed.spent
    wall, simulated = time.time() - wall0, clock() - sim0
    records = read_records(rundir)
    out = {
        "ranks": ranks,
        "nodes": n_nodes,
        "state": status["state"],
        "sim_s": round(simulated, 1),
        "wall_s": round(wall, 1),
        "driver_cpu_per_s": cpu / simulated,
        "scripted_cpu_s": round(Timed.spent, 2),
        "rss_mb": _peak_rss_mb(),
        "rss_growth_mb": _peak_rss_mb() - rss0,
        "faults": len(status["faults"]),
        "recovered": sum(f["recovered_at"] is not None for f in status["faults"]),
        "restarts": status["restarts"],
        "journal_records": len(records),
    }
    out |= latencies(sc, records)
    journal_b = os.path.getsize(rundir.local_path("journal.jsonl"))
    metrics_b = _bytes(f"{work}/runs/scale/r", ("metrics", "events"))
    out["journal_mb_per_day"] = journal_b / 1e6 * DAY / simulated
    out["metrics_mb_per_day"] = metrics_b / 1e6 * DAY / simulated
    out["objects_per_hour"] = (_files(work) - files0) * HOUR / simulated
    out |= two_weeks(records, work, simulated, args.whole)
    shutil.rmtree(work, ignore_errors=True)
    return out


def latencies(sc, records: list[dict]) -> dict:
    """Each placed or drawn fault's detection latency: from when it struck (the scenario's clock)
    to the first journalled fault of its kind, on its rank (or node), detected after it."""
    faults = sorted((r for r in records if r["type"] == "fault"), key=lambda r: r["detected_at"])
    worst: dict[str, float] = {}
    for (kind, step), t in sorted(sc.struck.items(), key=lambda x: x[1]):
        if kind not in KIND_OF:
            continue
        who = getattr(sc, kind)[step]
        found = next(
            (
                f
                for f in faults
                if f["detected_at"] >= t
                and f["kind"] == KIND_OF[kind]
                and (f["node"] == who if kind == "node_loss" else f["rank"] == who)
            ),
            None,
        )
        if found is None:
            if kind == "slow":  # a restart for another fault healed it first: nothing to detect
                continue
            raise SystemExit(f"a {kind} of {who} at {t:.1f} was not detected: {faults}")
        key = f"detect_{KIND_OF[kind]}_s"
        worst[key] = max(worst.get(key, 0.0), found["detected_at"] - t)
    return worst


def two_weeks(records: list[dict], work: str, simulated: float, whole: bool) -> dict:
    """`status` on a two-week journal: the simulated run's records after its first start, repeated
    to fill 14 days, written as the journal writes them (its status snapshots too: `Folder`, every
    `snapshot.EVERY` records); timed as `resilient status` reads it (`read_status`: the newest
    snapshot and the tail) and (`whole`), for comparison, as a whole fold."""
    from resilient.rundir import RunDir
    from resilient.runlog.journal import read_records
    from resilient.runlog.snapshot import Folder, read_status
    from resilient.runlog.status import fold

    first = next(i for i, r in enumerate(records) if r["type"] == "group_ready")
    head, body = records[: first + 1], records[first + 1 :]
    copies = max(1, round(14 * DAY / simulated))
    path = f"{work}/twoweeks/scale/r"
    os.makedirs(path)
    rundir, folder = RunDir(path), Folder(fold([]))
    body_lines = [(r, (json.dumps(r, sort_keys=True) + "\n").encode()) for r in body]
    with open(f"{path}/journal.jsonl", "wb") as f:
        for r, line in [(r, (json.dumps(r, sort_keys=True) + "\n").encode()) for r in head] + [
            x for _ in range(copies) for x in body_lines
        ]:
            f.write(line)
            folder.add(r, line, f.tell())
            if folder.due():
                f.flush()
                folder.write(rundir)
    t0 = time.perf_counter()
    s = read_status(rundir)
    status_s = time.perf_counter() - t0
    out = {}
    if whole:  # what status cost before the snapshots: the whole journal read and folded
        t0 = time.perf_counter()
        everything = fold(read_records(rundir))
        out["status_whole_fold_2w_s"] = time.perf_counter() - t0
        same = json.loads(json.dumps(everything, default=str))
        assert json.loads(json.dumps(s, default=str)) == same, "the snapshot's status differs"
        out |= api(rundir)
    return out | {
        "status_fold_2w_s": status_s,
        "journal_2w_mb": os.path.getsize(f"{path}/journal.jsonl") / 1e6,
        "journal_2w_records": folder.count,
        "status_2w_faults": len(s["faults"]),
    }


def api(rundir) -> dict:
    """The dashboard's `/api/state` on the run: its first answer (the journal read whole) and the
    next (what is new only)."""
    from fastapi.testclient import TestClient

    from resilient.dashboard.app import make_app

    client = TestClient(make_app(rundir), base_url="http://127.0.0.1")
    out = {}
    for key in ("api_2w_first_s", "api_2w_s"):
        t0 = time.perf_counter()
        r = client.get("/api/state")
        out[key] = time.perf_counter() - t0
        assert r.status_code == 200, r.text[:300]
    return out


def _files(root: str) -> int:
    return sum(len(fs) for _, _, fs in os.walk(root))


def _bytes(root: str, subdirs) -> int:
    total = 0
    for sub in subdirs:
        for d, _, fs in os.walk(os.path.join(root, sub)):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in fs)
    return total


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def growth(d: dict, key: str, lo: int, hi: int) -> float | None:
    a, b = d[str(lo)].get(key), d[str(hi)].get(key)
    if not a or not b or a <= 0 or b <= 0:
        return None
    return math.log(b / a) / math.log(hi / lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="8,64,256,1024")
    ap.add_argument("--nodes-per-8", type=float, default=1.0, help="nodes per 8 ranks")
    ap.add_argument("--spare-nodes", type=int, default=1)
    ap.add_argument("--hours", type=float, default=1.0, help="simulated hours per rank count")
    ap.add_argument("--step-s", type=float, default=1.0, help="simulated seconds per step")
    ap.add_argument("--start-s", type=float, default=20.0, help="simulated seconds to (re)start")
    ap.add_argument("--rank-mtbf-days", type=float, default=10.0)
    ap.add_argument("--node-mtbf-days", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument(
        "--whole",
        action="store_true",
        help="also time a whole fold (no snapshot) and the dashboard's /api/state",
    )
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child: one rank count
    ap.add_argument("--profile", action="store_true", help="with --one N: cProfile to stderr")
    args = ap.parse_args()
    if args.one:
        import logging

        logging.disable(logging.WARNING)  # the faults it survives are expected, not news
        print(json.dumps(one(args, args.one)))
        return
    out: dict[str, dict] = {}
    ranks = [int(x) for x in args.ranks.split(",")]
    argv = [a for a in sys.argv[1:] if not a.startswith("--json")]
    if "--json" in sys.argv:
        i = sys.argv.index("--json")
        argv = sys.argv[1:i] + sys.argv[i + 2 :]
    for n in ranks:
        t0 = time.time()
        print(f"{n} ranks: simulating {args.hours:g} h ...", flush=True)
        p = subprocess.run(
            [sys.executable, __file__, *argv, "--one", str(n)],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            sys.exit(f"{n} ranks failed: {(p.stderr or p.stdout).strip()[-800:]}")
        out[str(n)] = d = json.loads(p.stdout.strip().splitlines()[-1])
        print(
            f"  {time.time() - t0:.0f} s: cpu/s {d['driver_cpu_per_s']:.4f}, rss "
            f"{d['rss_mb']:.0f} MB, crash {d.get('detect_crash_s', 0):.2f} s, hang "
            f"{d.get('detect_hang_s', 0):.2f} s, straggler {d.get('detect_straggler_s', 0):.1f} s, "
            f"journal {d['journal_mb_per_day']:.1f} MB/day, status 2w "
            f"{d['status_fold_2w_s']:.2f} s, faults {d['faults']} ({d['state']})",
            flush=True,
        )
    table(out, ranks)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


KEYS = (
    "driver_cpu_per_s", "rss_mb", "detect_crash_s", "detect_hang_s", "detect_straggler_s",
    "detect_node_loss_s", "journal_mb_per_day", "metrics_mb_per_day", "objects_per_hour",
    "status_fold_2w_s", "status_whole_fold_2w_s", "api_2w_first_s", "api_2w_s",
)  # fmt: skip


def table(out: dict, ranks: list[int]) -> None:
    print("\n| ranks | " + " | ".join(KEYS) + " |")
    print("|---" * (len(KEYS) + 1) + "|")
    for n in ranks:
        d = out[str(n)]
        cells = [f"{d[k]:.3g}" if isinstance(d.get(k), float) else str(d.get(k, "-")) for k in KEYS]
        print(f"| {n} | " + " | ".join(cells) + " |")
    if len(ranks) > 1:
        lo = 64 if 64 in ranks[:-1] else ranks[0]
        hi = ranks[-1]
        ex = {k: growth(out, k, lo, hi) for k in KEYS}
        print(
            f"\ngrowth exponent {lo} -> {hi} ranks (1 = linear): "
            + ", ".join(f"{k} {v:.2f}" for k, v in ex.items() if v is not None)
        )


if __name__ == "__main__":
    main()
