"""Background priority on an embedded cluster (agents.priority, launcher.cluster): the ranks'
threads run at normal priority, and what may wait runs below them: an actor's main thread once
lowered (its method threads, which train, are not), and Ray's dashboard processes."""

import os
import threading

import psutil
import pytest
import ray

from resilient.agents.priority import BACKGROUND_NICE, actor_main_thread
from resilient.config import ClusterConfig
from resilient.launcher.cluster import connect, is_background

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


@ray.remote(num_cpus=0, max_concurrency=4, concurrency_groups={"lease": 1, "store": 2})
class Worker:
    """Like TrainWorker: concurrency groups, a thread started by a method that trains."""

    def info(self) -> int:
        actor_main_thread()  # a rank's first call
        return os.getpid()

    def start(self) -> dict:
        got = {}

        def train():
            got["train"] = nice(threading.get_native_id())

        t = threading.Thread(target=train)
        t.start()
        t.join()
        return {"method": nice(threading.get_native_id()), **got}

    @ray.method(concurrency_group="lease")
    def renew(self) -> int:
        return nice(threading.get_native_id())


@pytest.fixture(scope="module")
def embedded():
    conn = connect(ClusterConfig(num_workers=1, spares=0))
    yield
    conn.close()


def test_training_threads_run_at_normal_priority_and_the_main_thread_below(embedded):
    w = Worker.remote()
    pid = ray.get(w.info.remote())
    assert nice(pid) == BACKGROUND_NICE  # Ray's signal check, 100 times a second
    started = ray.get(w.start.remote())
    assert started == {"method": 0, "train": 0}  # Ray's default would be 15 for both
    assert ray.get(w.renew.remote()) == 0
    ray.kill(w)


def test_rays_dashboard_processes_run_in_the_background(embedded):
    procs = psutil.Process().children(recursive=True)
    lowered = [p for p in procs if is_background(p.cmdline())]
    assert len(lowered) >= 2, "no dashboard or monitor processes found to check"
    for p in lowered:
        assert {nice(t.id) for t in p.threads()} == {BACKGROUND_NICE}, p.cmdline()[:2]
    # the raylet routes every call, and the workers it starts inherit its priority: not lowered
    ray_own = [p for p in procs if p.name() in ("raylet", "gcs_server")]
    assert len(ray_own) == 2 and all(nice(p.pid) == 0 for p in ray_own)
