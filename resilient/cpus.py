"""CPUs: how many this process may run on.

Contract: `usable()` is the number of CPUs in this process's affinity mask (a Slurm allocation's
cpuset, `taskset`), capped by the container's CPU quota (cgroups, read as Ray reads it), at least
1. `os.cpu_count()` counts the host's: in a container limited to 2 CPUs on a 64-CPU host an
embedded cluster would offer Ray 64 CPUs, and Ray would start a worker process for each.
"""

from __future__ import annotations

import os


def affinity() -> int:
    """The CPUs this process may be scheduled on (the host's count where there is no mask)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def usable() -> int:
    """`affinity()`, capped by the container's CPU quota where one is set (whole CPUs)."""
    n = affinity()
    try:  # Ray's own reading of cgroups v1/v2 (the quota, else the host's count)
        from ray._private.utils import get_num_cpus

        n = min(n, max(1, int(get_num_cpus(override_docker_cpu_warning=True))))
    except Exception:  # Ray's internals moved: the affinity alone
        pass
    return n
