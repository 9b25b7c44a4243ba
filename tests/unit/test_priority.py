"""Lowering is relative to the niceness a process was started at (agents.priority), and the CPU
count an embedded cluster offers Ray is the CPUs this process may use (cpus)."""

import os
import subprocess
import sys
import threading

import pytest

from resilient.agents.priority import below, lower_main_thread, lowered

pytestmark = pytest.mark.timeout(60)


def test_below_is_nineteen_levels_down_and_never_past_the_lowest():
    assert [below(n) for n in (-20, -10, 0, 5, 19)] == [-1, 9, 19, 19, 19]


def _run(code: str, *prefix: str) -> str:
    out = subprocess.run(
        [*prefix, sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


LOWER = """
import os, threading
from resilient.agents.priority import lower_main_thread
t = threading.Thread(target=lower_main_thread)
t.start(); t.join()
print(os.getpriority(os.PRIO_PROCESS, os.getpid()))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="niceness per thread is Linux's")
@pytest.mark.parametrize("base", [-10, 0, 5])
def test_a_main_thread_is_lowered_from_the_niceness_it_was_started_at(base):
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if base < own and os.geteuid() != 0:
        pytest.skip("raising a niceness needs root")
    assert int(_run(LOWER, "nice", "-n", str(base - own))) == below(base)


@pytest.mark.skipif(sys.platform != "linux", reason="niceness per thread is Linux's")
def test_lowered_reads_the_calling_threads_own_niceness():
    got = []
    t = threading.Thread(target=lambda: (os.nice(3), got.append(lowered())))
    t.start()
    t.join()
    assert got == [below(os.getpriority(os.PRIO_PROCESS, 0) + 3)]


def test_lower_main_thread_does_nothing_on_the_main_thread():
    before = os.getpriority(os.PRIO_PROCESS, 0)
    lower_main_thread()
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


CPUS = "from resilient.cpus import usable, affinity; print(usable(), affinity())"


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no affinity masks here")
def test_the_usable_cpus_are_the_affinity_masks_not_the_hosts():
    one = str(min(os.sched_getaffinity(0)))  # a CPU this process may use (a cpuset may lack 0)
    assert _run(CPUS, "taskset", "-c", one) == "1 1"
    usable, affinity = map(int, _run(CPUS).split())
    assert affinity == len(os.sched_getaffinity(0)) and 1 <= usable <= affinity  # a quota: fewer
