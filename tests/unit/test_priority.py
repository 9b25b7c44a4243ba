"""agents.priority: one thread lowered, never the others of its process."""

import os
import threading

import pytest

from resilient.agents.priority import BACKGROUND_NICE, background

pytestmark = pytest.mark.timeout(30)


def nice(tid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, tid)


def test_background_lowers_the_calling_thread_only():
    got = {}

    def lowered():
        background()
        got["self"] = nice(threading.get_native_id())
        child = threading.Thread(target=lambda: got.update(child=nice(threading.get_native_id())))
        child.start()
        child.join()

    before = nice(threading.get_native_id())
    t = threading.Thread(target=lowered)
    t.start()
    t.join()
    assert got == {"self": BACKGROUND_NICE, "child": BACKGROUND_NICE}  # inherited: documented
    assert nice(threading.get_native_id()) == before


def test_a_thread_id_that_is_gone_is_no_error():
    background(2**22 + 12345)  # no such thread: nothing happens


def test_only_rays_dashboard_and_monitor_are_background_processes():
    from resilient.launcher.cluster import is_background

    site = "/venv/lib/python3.11/site-packages/ray"
    assert is_background(["/venv/bin/python", f"{site}/dashboard/dashboard.py", "--host=127.0.0.1"])
    assert is_background(["/venv/bin/python", "-u", f"{site}/autoscaler/_private/monitor.py"])
    assert is_background(["ray::DashboardAgent", "", ""])
    raylet = [
        f"{site}/core/src/ray/raylet/raylet",
        "--raylet_socket_name=/tmp/ray/s/sockets/raylet",
        "--store_socket_name=/tmp/ray/s/sockets/plasma_store",
        f"--dashboard_agent_command=/venv/bin/python -u {site}/dashboard/agent.py",
    ]
    assert not is_background(raylet)  # its workers would inherit a lowered priority
    assert not is_background(["ray::TrainWorker", ""]) and not is_background([])
