"""Heartbeat fan-in: what the driver pays per rank for heartbeats and leases, with real Ray actors.

What a simulation cannot show: the cost of the Ray calls, at the driver. Light actors (no torch: a
thread that "trains" a step every `--step-s` and keeps its step records, a heartbeat method on a
thread of its own, a lease renewal) stand in for the ranks; the driver runs the real
`WorkerGroup.poll`, the real `Watch` over it (every 0.1 s tick) and the real `LeaseKeeper`, for
`--seconds` per actor count, in each `--relay` mode:
- "off": one heartbeat call and one lease renewal per rank per second, from the driver;
- "on": light node agents (`--per-node` ranks each) hold the real `agents.relay.Relay`: the driver
  sends one gather and one renewal per node per second, each agent polls and renews its ranks.
Reported per mode and count: the driver's CPU seconds per second (all its threads), per rank, the
agents' CPU (the per-rank calls moved there), and the linear extrapolation of the driver's cost to
1,024 ranks (fitted over the counts measured: fixed + per-rank cost).
Usage: python bench/fanin.py [--actors 8,32,64,128] [--relay off,on] [--per-node 8]
       [--seconds 30] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

import ray  # noqa: E402

from resilient.agents.heartbeat import Heartbeat  # noqa: E402
from resilient.agents.relay import Relay, RelayMethods  # noqa: E402


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"lease": 1})
class Light:
    """A rank without a model: a step every `step_s` on a thread, each with the record a real
    rank reports (`heartbeat.step_record`'s fields), handed over by `heartbeat()`."""

    def __init__(self, rank: int, step_s: float):
        self.rank, self.step, self.records = rank, 0, []
        self._lock = threading.Lock()
        threading.Thread(target=self._train, args=(step_s,), daemon=True).start()

    def _train(self, step_s: float) -> None:
        while True:
            time.sleep(step_s)
            with self._lock:
                self.step += 1
                self.records.append(
                    {"t": time.time(), "rank": self.rank, "step": self.step,
                     "data_step": self.step, "loss": 2.0, "mean_loss": 2.0, "grad_norm": 1.0,
                     "step_time": step_s, "compute_s": step_s / 2, "data_wait": 0.0,
                     "attempt": 0, "tokens_per_s": 1000.0, "overflow": False, "lr": 1e-4}
                )  # fmt: skip

    def pid(self) -> dict:
        return {"pid": os.getpid(), "ip": "198.18.0.254", "node_id": "n"}  # never "here"

    def heartbeat(self) -> Heartbeat:
        with self._lock:
            metrics, self.records = tuple(self.records), []
            step = self.step
        return Heartbeat(
            self.rank, os.getpid(), "training", time.time(), step, metrics=metrics,
            training_at=0.0, step_done_at=time.time(), first_step_done_at=0.0,
        )  # fmt: skip

    @ray.method(concurrency_group="lease")
    def renew(self, sent_at: float) -> bool:
        return True


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"lease": 1, "relay": 2})
class LightAgent(RelayMethods):
    """A node agent without a checkpoint tier or sampler: the real Relay, as NodeAgent holds it."""

    def __init__(self):
        self.relay = Relay()

    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="lease")
    def renew(self, sent_at: float) -> bool:
        self.relay.renew(sent_at)
        return True


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def measure(n: int, seconds: float, step_s: float, relay: str, per_node: int) -> dict:
    """The driver's cost over `seconds` of the real poll, Watch and LeaseKeeper over `n` actors
    (`relay` "on": through light node agents of `per_node` ranks each)."""
    from resilient.agents.group import WorkerGroup
    from resilient.agents.lease import LeaseKeeper
    from resilient.agents.relays import NodeRelays
    from resilient.config import validate_tree
    from resilient.supervisor.watch import Watch

    tree = {"name": "fanin", "data": {"path": __file__}, "supervisor": {"heartbeat_relay": relay}}
    spec = validate_tree(tree)
    actors = [Light.remote(r, step_s) for r in range(n)]
    infos = ray.get([a.pid.remote() for a in actors], timeout=600)
    nodes = [f"n{r // per_node}" for r in range(n)]
    agents = {node: LightAgent.remote() for node in dict.fromkeys(nodes)} if relay == "on" else {}
    agent_pids = ray.get([a.pid.remote() for a in agents.values()], timeout=600)
    for info, node in zip(infos, nodes, strict=True):
        info["node_id"] = node
    group = WorkerGroup.__new__(WorkerGroup)  # the real poll, without placement or spares
    group.spec, group.workers, group.infos, group.placement = spec, actors, infos, nodes
    group.pending, group.issued_at, group.last_answer = {}, {}, {}
    group.latest, group.dead, group._here = {}, {}, set()
    group.agent_for, group.relays = agents.get, NodeRelays()
    group._relay()  # as WorkerGroup.start() ends
    watch = Watch(group, 0, n, spec.supervisor)

    def unrenewed() -> list:  # as Fleet._leased: the agents no gather renewed, the direct ranks
        renewed = group.relays.renewing(1.0)
        return [a for n, a in agents.items() if n not in renewed] + group.leased()

    leases = LeaseKeeper(unrenewed, 1.0).start()
    for _ in range(30):  # every rank answered once: the steady state
        watch.poll()
    got = steps = 0
    cpu0, t0, agents0 = time.process_time(), time.time(), _cpu(agent_pids)
    while time.time() - t0 < seconds:
        seen = watch.poll()
        got += len(seen.fresh)
        steps += len(seen.metrics)
        if seen.fault:
            raise SystemExit(f"{n} actors: {seen.fault}")
    cpu, wall = time.process_time() - cpu0, time.time() - t0
    agents_cpu = _cpu(agent_pids) - agents0
    leases.close()
    for a in actors + list(agents.values()):
        ray.kill(a)
    return {
        "actors": n,
        "relay": relay,
        "nodes": len(agents),
        "driver_cpu_per_s": cpu / wall,
        "cpu_ms_per_rank_s": cpu / wall / n * 1e3,
        "agents_cpu_per_s": agents_cpu / wall,
        "heartbeats_per_s": got / wall,
        "records_per_s": steps / wall,
    }


def fit(rows: list[dict]) -> tuple[float, float, float]:
    """Least squares, cpu = fixed + per_rank * n: (fixed, per_rank, at 1,024 ranks)."""
    xs, ys = [r["actors"] for r in rows], [r["driver_cpu_per_s"] for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    per = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0
    fixed = my - per * mx
    return fixed, per, fixed + per * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actors", default="8,32,64,128")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--step-s", type=float, default=1.0, help="each light rank's step")
    ap.add_argument("--relay", default="off,on", help="the modes measured (off, on)")
    ap.add_argument("--per-node", type=int, default=8, help="ranks per node agent (relay on)")
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args()
    from resilient.launcher.cluster import QUIET

    ray.init(  # as the launcher starts an embedded cluster
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
        _system_config=QUIET,
    )
    rows, fits = [], {}
    try:
        for relay in a.relay.split(","):
            for n in (int(x) for x in a.actors.split(",")):
                t0 = time.time()
                rows.append(r := measure(n, a.seconds, a.step_s, relay, a.per_node))
                print(
                    f"relay {relay:3s} {n:5d} actors: driver {r['driver_cpu_per_s']:.4f} CPU-s/s "
                    f"({r['cpu_ms_per_rank_s']:.3f} ms per rank-second), agents "
                    f"{r['agents_cpu_per_s']:.3f} CPU-s/s, {r['heartbeats_per_s']:.0f} "
                    f"heartbeats/s, {r['records_per_s']:.0f} records/s ({time.time() - t0:.0f} s)",
                    flush=True,
                )
            fixed, per, at = fit([r for r in rows if r["relay"] == relay])
            fits[relay] = {"fixed": fixed, "per_rank": per, "at_1024": at}
            print(
                f"relay {relay}: fit {fixed:.4f} + {per * 1e3:.3f} ms x ranks CPU-s/s -> at 1,024 "
                f"ranks {at:.3f} of one core (heartbeats and leases, driver side)",
                flush=True,
            )
    finally:
        ray.shutdown()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "fits": fits}, f, indent=1)


if __name__ == "__main__":
    main()
