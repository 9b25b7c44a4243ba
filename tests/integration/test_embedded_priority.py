"""Priorities on an embedded cluster (launcher.cluster): the ranks' threads run at normal
priority (Ray's default niceness 15 put them below every other thread of the machine), and Ray's
processes that may wait run below them; the raylet and the GCS do not. In each worker, Ray's main
thread (it only dispatches calls and checks for signals every 10 ms) runs below the rest once the
worker has had its first call (agents.priority)."""

import os
import threading
import time

import psutil
import pytest
import ray

from resilient.agents.priority import lower_main_thread
from resilient.config import ClusterConfig
from resilient.launcher.cluster import connect, is_background
from tests.helpers import LOWERED_NICE, NORMAL_NICE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def started(p: psutil.Process) -> float:
    """When `p` started; 0 for a process already ended (a zombie not reaped yet)."""
    try:
        return 0.0 if p.status() == psutil.STATUS_ZOMBIE else p.create_time()
    except psutil.Error:
        return 0.0


def command(p: psutil.Process) -> list[str]:
    """`p`'s command line; [] for one that ended since it was listed (a worker `ray.kill` ended
    becomes a zombie until the raylet reaps it)."""
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"lease": 1, "store": 2})
class Worker:
    """Like TrainWorker: concurrency groups, a first call that lowers the main thread, and a
    thread started by a method that trains."""

    def ping(self) -> int:
        lower_main_thread()
        return nice(threading.get_native_id())

    def start(self) -> dict:
        got = {}

        def train():
            got["train"] = nice(threading.get_native_id())

        t = threading.Thread(target=train)
        t.start()
        t.join()
        return {"main": nice(os.getpid()), "method": nice(threading.get_native_id()), **got}

    @ray.method(concurrency_group="lease")
    def renew(self) -> int:
        return nice(threading.get_native_id())


@pytest.fixture(scope="module")
def embedded():
    started = time.time() - 1.0  # process start times are rounded: a second of slack
    conn = connect(ClusterConfig(num_workers=1, spares=0))
    yield started
    conn.close()


def test_workers_train_at_normal_priority(embedded):
    w = Worker.remote()
    normal = {"main": NORMAL_NICE, "method": NORMAL_NICE, "train": NORMAL_NICE}
    assert ray.get(w.start.remote()) == normal  # Ray's default: 15 more
    assert ray.get(w.renew.remote()) == NORMAL_NICE
    ray.kill(w)


def test_a_workers_main_thread_runs_below_its_training_after_its_first_call(embedded):
    w = Worker.remote()
    assert ray.get(w.ping.remote()) == NORMAL_NICE  # the pool thread it ran on is not lowered
    # nor are the threads Ray starts once __init__ is done, or the ones they start (the training)
    want = {"main": LOWERED_NICE, "method": NORMAL_NICE, "train": NORMAL_NICE}
    assert ray.get([w.start.remote() for _ in range(4)]) == [want] * 4
    assert ray.get(w.renew.remote()) == NORMAL_NICE == ray.get(w.ping.remote())
    ray.kill(w)


def test_rays_dashboard_and_monitor_run_below_the_ranks(embedded):
    # this cluster's (an earlier test module's Ray may still be ending, or left zombies)
    listed = [p for p in psutil.Process().children(recursive=True) if started(p) >= embedded]
    procs = [p for p in listed if command(p)]
    lowered = [p for p in procs if is_background(command(p))]
    assert len(lowered) >= 2, "no dashboard or monitor processes found to check"
    for p in lowered:
        assert {nice(t.id) for t in p.threads()} == {LOWERED_NICE}, p.cmdline()[:2]
    # the raylet routes every call, and the workers it starts inherit its priority: not lowered
    ray_own = [p for p in procs if p.name() in ("raylet", "gcs_server")]
    assert len(ray_own) == 2 and all(nice(p.pid) == NORMAL_NICE for p in ray_own)
