"""An embedded cluster (launcher.cluster) does not hear a SIGTERM meant for the launch (a process
group's or a control group's): its GCS, raylet and workers go on serving until the launch closes
the connection, which ends every one of them at once."""

import os
import signal
import time

import psutil
import pytest
import ray

from resilient.config import ClusterConfig
from resilient.launcher import shield
from resilient.launcher.cluster import connect

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@ray.remote(num_cpus=0)
class Echo:
    def pid(self) -> int:
        return os.getpid()


def rays(since: float) -> list[psutil.Process]:
    """This process's descendants started since `since` (Ray's: a process start time is rounded,
    hence the second of slack; not what earlier tests in this process left, such as a tracker's
    service)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.create_time() >= since - 1.0:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.parametrize("nodes", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_rays_processes_outlive_a_sigterm_to_every_process_and_end_with_the_connection(nodes):
    since = time.time()
    conn = connect(ClusterConfig(num_workers=1, spares=0, local_nodes=nodes))
    try:
        actor = Echo.remote()
        pid = ray.get(actor.pid.remote(), timeout=60)
        ray_procs = rays(since)
        assert pid in {p.pid for p in ray_procs}
        for p in ray_procs:  # the worker, the raylet and the GCS among them
            try:
                p.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        time.sleep(1.0)  # what the signal would do (Ray's raylet ends in ~0.1 s) has done it
        assert ray.get(actor.pid.remote(), timeout=10) == pid
        assert ray.get(Echo.remote().pid.remote(), timeout=60) != pid  # the raylet starts more
        ray_procs = rays(since)
    finally:
        t0 = time.monotonic()
        conn.close()
    assert time.monotonic() - t0 < 5
    assert not [p.pid for p in ray_procs if shield.alive(p)]
