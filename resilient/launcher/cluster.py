"""Connecting to Ray: an embedded local cluster (one or several simulated nodes) or an existing one.

Contract: `connect(cluster, workers)` returns a `Connection` whose `close()` undoes exactly what it
started; `check_capacity(spec)` raises UserError naming `cluster.num_workers` when the worker
bundles cannot all be placed on the cluster's nodes.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass

import psutil
import ray

from resilient.agents import priority
from resilient.config import ClusterConfig, JobSpec
from resilient.cpus import usable as usable_cpus
from resilient.errors import UserError
from resilient.launcher import shield
from resilient.launcher.reaper import Reaper

PROBE_S = 5.0  # how long a cluster address gets to accept a connection before the launch gives up
# An embedded cluster's Ray keeps no per-process metrics or task events (nothing here reads them):
# each process's reporting threads, and the log monitor (log_to_driver is off), take CPU from the
# ranks on a small machine. Its workers run at normal priority: Ray's default (niceness 15) puts
# every rank below each thread of the driver, the raylet and Ray's dashboard processes, which then
# take a core from a rank whenever they wake; Ray's processes that may wait are lowered instead
# (`background_ray`).
QUIET = {
    "enable_metrics_collection": False,
    "task_events_report_interval_ms": 0,
    "worker_niceness": 0,
}


@dataclass
class Connection:
    embedded: bool
    cluster: object | None = None  # ray.cluster_utils.Cluster when simulating several nodes
    reaper: Reaper | None = None  # ends the embedded cluster should this launch be SIGKILLed

    def close(self) -> None:
        if not self.embedded:
            ray.shutdown()
            return
        # Ray's processes here block SIGTERM (shield): this driver disconnects, then ends them
        # with SIGKILL, rather than Ray waiting a second on each for a SIGTERM they never hear.
        deaf = shield.deaf_descendants()
        node = _detach_node()
        ray.shutdown()  # without its node: only disconnects
        shield.end(deaf)
        if node is not None:
            _reap(node)
        if self.cluster is not None:
            self.cluster.shutdown()  # its processes are gone: it reaps them and forgets the address
        if self.reaper is not None:
            self.reaper.done()

    def end_now(self) -> None:
        """An embedded cluster's processes SIGKILLed, for a launch about to exit without closing
        (an end from the signals' thread): deaf to SIGTERM, they would outlive it."""
        if self.embedded:
            shield.end(shield.deaf_descendants(), wait_s=1.0)
        if self.reaper is not None:
            self.reaper.done(wait_s=0.5)


def connect(cfg: ClusterConfig, spares: int = 0) -> Connection:
    """`spares`: warm spares the job reserves slots for; an embedded cluster gets logical CPUs for
    them on top of this machine's (an idle spare costs nothing, so it may oversubscribe it)."""
    common = dict(
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        configure_logging=True,
    )
    if cfg.address:
        _reachable(cfg.address)
        try:
            ray.init(address=cfg.address, **common)
        except Exception as e:  # refused, a wrong token, not a Ray GCS: all the user's to fix
            raise UserError(
                f"cluster.address {cfg.address!r}: cannot connect to Ray "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); start one "
                "with `ray start --head`, check the address and the token (RAY_AUTH_TOKEN or "
                '~/.ray/auth_token), or set cluster.address = "" for an embedded local cluster'
            ) from None
        return Connection(embedded=False)
    cpus = usable_cpus() + math.ceil(spares * cfg.resources_per_worker.get("CPU", 0))
    if cfg.local_nodes == 1:
        with shield.shielded():
            ray.init(address="local", num_cpus=cpus, _system_config=QUIET, **common)
        _no_log_monitor()
        background_ray()
        return Connection(embedded=True, reaper=Reaper.start(shield.deaf_descendants()))
    from ray.cluster_utils import Cluster

    # The head node (GCS, this driver) gets no CPUs, so no rank or agent lands on it: a simulated
    # node can then be removed (chaos `node_loss`) without taking the control plane with it.
    per_node = max(1, math.ceil(cpus / cfg.local_nodes))
    # Simulated nodes die for real (chaos kills their raylet): notice that in seconds, not Ray's
    # default ~30 s.
    fast_death = {
        "health_check_period_ms": 500,
        "health_check_failure_threshold": 4,
        "health_check_initial_delay_ms": 1000,
    }
    with shield.shielded():
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "_system_config": fast_death | QUIET},
        )
        for _ in range(cfg.local_nodes):
            cluster.add_node(num_cpus=per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, **common)
    background_ray()
    reaper = Reaper.start(shield.deaf_descendants())
    return Connection(embedded=True, cluster=cluster, reaper=reaper)


def _detach_node():
    """Take from Ray its handle on the processes `ray.init` started (None when it started none, or
    its internals moved: then `ray.shutdown()` ends them itself, a second each)."""
    worker = ray._private.worker
    node = getattr(worker, "_global_node", None)
    if node is not None:
        worker._global_node = None
    return node


def _reap(node) -> None:
    """What `ray.shutdown()` does with its node, its processes already SIGKILLed: spilled objects
    removed, the ended processes reaped."""
    try:
        if node.is_head():
            node.destroy_external_storage()
        node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    except Exception as e:  # Ray's internals moved: the processes are gone all the same
        logging.getLogger(__name__).debug("embedded Ray's processes not reaped: %s", e)


def _no_log_monitor() -> None:
    """End the embedded cluster's log monitor: it tails every worker's log files for a driver that
    asked for none (log_to_driver=False; the ranks' output reaches logs/ through heartbeats)."""
    try:
        ray._private.worker._global_node.kill_log_monitor()
    except Exception as e:  # Ray's internals moved: the monitor only costs CPU
        logging.getLogger(__name__).debug("log monitor left running: %s", e)


# Ray's processes an embedded cluster does not need promptly: its dashboard (head and per-node
# agent: nothing here uses them) and its autoscaler monitor (there is nothing to scale), with what
# they start. Never the raylet (it routes every call, and the workers it starts inherit its
# priority) nor the GCS. (The agent takes its title only once it is up: both names count.)
BACKGROUND_SCRIPTS = (
    "dashboard/dashboard.py",
    "dashboard/agent.py",
    "autoscaler/_private/monitor.py",
)
BACKGROUND_TITLES = ("ray::DashboardAgent",)


def is_background(cmdline: list[str]) -> bool:
    """Whether a process (by its command line) is one of Ray's that `background_ray` lowers."""
    return bool(cmdline) and (
        cmdline[0].startswith(BACKGROUND_TITLES)
        or any(arg.endswith(BACKGROUND_SCRIPTS) for arg in cmdline[1:3])
    )


def background_ray() -> None:
    """Lower every thread of an embedded cluster's dashboard and monitor processes (this driver's
    descendants) and of what they started to `priority.lowered()` (19 levels below this thread's
    niceness, which the ranks inherit), so they run on the CPU time the ranks leave (Linux keeps
    niceness per thread: each one is lowered)."""
    nice = priority.lowered()
    for p in psutil.Process().children(recursive=True):
        try:
            if is_background(p.cmdline()):
                for q in [p, *p.children(recursive=True)]:
                    for t in q.threads():
                        os.setpriority(os.PRIO_PROCESS, t.id, nice)
        except (psutil.Error, OSError):  # ended meanwhile, or not allowed: left as it is
            pass


def _reachable(address: str) -> None:
    """A "HOST:PORT" address must accept a TCP connection within PROBE_S, or the launch ends now
    (exit 2) naming what was tried: Ray's own client retries a dead address for a minute or more,
    printing only C++ warnings. ("auto" is Ray's to resolve: it fails fast by itself.)"""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as e:
        why = {
            ConnectionRefusedError: "connection refused: nothing listens there",
            TimeoutError: f"no answer within {PROBE_S:g}s",
        }.get(type(e), f"{type(e).__name__}: {e.strerror or e}")
        raise UserError(
            f"cluster.address {address!r}: no Ray cluster reached (tried a TCP connection to "
            f"{host}:{port}: {why}); start one with `ray start --head --port {port}` there, "
            'give the head\'s GCS address, or set cluster.address = "" for an embedded local '
            "cluster"
        ) from None


def placeable(bundle: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many copies of `bundle` fit on these nodes (a bundle never spans nodes)."""
    total = 0
    for res in nodes:
        fits = [math.floor(res.get(k, 0) / v + 1e-9) for k, v in bundle.items() if v > 0]
        total += min(fits) if fits else 1 << 30
    return total


def check_capacity(spec: JobSpec, spares: int = 0) -> None:
    """The ranks' bundles, and `spares` more (an embedded cluster, sized for them), fit."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    bundle = spec.cluster.resources_per_worker
    fit = placeable(bundle, nodes) - spares
    if fit < spec.cluster.least:  # an elastic job may start on fewer ranks, and grow
        raise UserError(
            f"cluster.num_workers = {spec.cluster.num_workers} cannot be placed: the cluster's "
            f"{len(nodes)} node(s) "
            f"fit only {fit} worker(s) of cluster.resources_per_worker = {bundle}. Lower "
            "cluster.num_workers "
            "or cluster.resources_per_worker (e.g. {CPU = 0.5}), or add nodes."
        )
