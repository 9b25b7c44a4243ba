"""launcher.reaper: what a launch told its reaper of ends with the launch when the launch is
SIGKILLed (its descendants too), and is left alone when the launch said it is done."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from resilient.launcher import shield
from tests.helpers import await_gone

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups, /proc"),
]

# A stand-in for a launch: a "cluster" (a child that starts a grandchild, as the raylet starts its
# agents), a reaper told of the child, the pids printed; then it says it is done when asked (a
# line on its stdin), or waits to be killed.
LAUNCH = """
import subprocess, sys, time
from resilient.launcher.reaper import Reaper
sleep = "import time; time.sleep(120)"
tree = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
child = subprocess.Popen([sys.executable, "-c", tree])
import psutil
while not psutil.Process(child.pid).children():
    time.sleep(0.01)
reaper = Reaper.start([psutil.Process(child.pid)])
grandchild = psutil.Process(child.pid).children()[0]
print(child.pid, grandchild.pid, reaper.proc.pid, flush=True)
if sys.stdin.readline().strip() == "done":
    reaper.done()
    print("done", flush=True)
time.sleep(120)
"""


def start_launch():
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    pids = [int(x) for x in proc.stdout.readline().split()]
    return proc, [psutil.Process(p) for p in pids]


def _cleanup(proc, procs) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.kill()
    proc.wait()


def test_a_sigkilled_launch_takes_what_it_told_its_reaper_of_and_their_descendants():
    proc, (child, grandchild, reaper) = start_launch()
    try:
        assert all(shield.alive(p) for p in (child, grandchild, reaper))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not await_gone([child, grandchild, reaper])
    finally:
        _cleanup(proc, [child, grandchild, reaper])


def test_a_launch_that_is_done_leaves_its_processes_alone_and_its_reaper_ends():
    proc, (child, grandchild, reaper) = start_launch()
    try:
        proc.stdin.write("done\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        assert not await_gone([reaper])
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        time.sleep(0.5)  # what a reaper would have done by now (it is gone: nothing to await)
        assert shield.alive(child) and shield.alive(grandchild)
    finally:
        _cleanup(proc, [child, grandchild, reaper])


def test_the_reaper_does_not_hear_a_signal_to_the_launch_s_group():
    proc, (child, grandchild, reaper) = start_launch()
    try:
        assert os.getpgid(reaper.pid) != os.getpgid(proc.pid)  # a session of its own
        assert shield.blocks_sigterm(reaper.pid)  # from its start
        reaper.send_signal(signal.SIGTERM)
        reaper.send_signal(signal.SIGINT)
        time.sleep(0.3)  # a signal it does not ignore ends it within milliseconds
        assert shield.alive(reaper)
    finally:
        _cleanup(proc, [child, grandchild, reaper])
