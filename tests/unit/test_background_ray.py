"""launcher.cluster: which of Ray's processes an embedded cluster runs in the background."""

import pytest

from resilient.launcher.cluster import is_background

pytestmark = pytest.mark.timeout(30)

SITE = "/venv/lib/python3.11/site-packages/ray"


def test_rays_dashboard_agent_and_monitor_are_background_processes():
    assert is_background(["/venv/bin/python", f"{SITE}/dashboard/dashboard.py", "--host=x"])
    assert is_background(["/venv/bin/python", "-u", f"{SITE}/dashboard/agent.py", "--node-ip"])
    assert is_background(["ray::DashboardAgent", "", ""])  # its title, once it is up
    assert is_background(["/venv/bin/python", "-u", f"{SITE}/autoscaler/_private/monitor.py"])


def test_the_raylet_gcs_and_workers_are_not():
    raylet = [
        f"{SITE}/core/src/ray/raylet/raylet",
        "--raylet_socket_name=/tmp/ray/s/sockets/raylet",
        "--store_socket_name=/tmp/ray/s/sockets/plasma_store",
        f"--dashboard_agent_command=/venv/bin/python -u {SITE}/dashboard/agent.py",
    ]
    assert not is_background(raylet)  # the workers it starts would inherit a lowered priority
    assert not is_background([f"{SITE}/core/src/ray/gcs/gcs_server", "--log_dir=/tmp/x"])
    assert not is_background(["ray::TrainWorker", ""]) and not is_background([])
    assert not is_background(["ray::RuntimeEnvAgent", ""])
