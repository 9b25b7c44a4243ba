"""Where an agent's threads stand in the CPU's queue (Linux keeps policy and niceness per thread).

Contract: `idle_this_thread()` puts the calling thread at idle priority (a spare's warm-up: it runs
on CPU time the ranks leave unused); `lower_main_thread()`, called from any method of a threaded
actor, lowers the process's main thread alone to niceness DISPATCH_NICE. Neither touches another
thread, and neither can be undone by an unprivileged process: the thread that will train (started
from one of the actor's pool threads) keeps normal priority.
"""

from __future__ import annotations

import os
import sys
import threading

# In a threaded Ray actor the main thread only hands each call to a pool thread and, on a 10 ms
# timer of Ray's own (no setting), takes the GIL to check for signals. At normal priority each of
# those 100 wakeups a second, in every rank, spare and node agent, could preempt a training
# thread (a rank's was preempted ~500 times a second, plain DDP's ~130); at 19 they wait for a
# core to go idle, as one does every step when a rank waits on its peers. It still gets its share
# (~1.4% of a contended core, several times what it uses), so a call waits a few milliseconds at
# most (heartbeats, leases and hang timeouts are in seconds).
DISPATCH_NICE = 19


def idle_this_thread() -> None:
    """SCHED_IDLE for the calling thread only, so the thread that will train is never lowered (an
    unprivileged process could not raise it back)."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux: a plain nice
        try:
            os.nice(10)
        except OSError:
            pass


def lower_main_thread() -> None:
    """Niceness DISPATCH_NICE for this process's main thread alone (a second call changes
    nothing). Call it from an actor's method (a pool thread), never from `__init__`: Ray starts the
    actor's pool threads from the main thread once `__init__` has returned, and a thread inherits
    its creator's niceness (the training thread, started from a pool thread, keeps normal
    priority). Nothing off Linux, where niceness is the whole process's, nor on the main thread
    itself (a plain actor works there)."""
    if sys.platform != "linux" or threading.current_thread() is threading.main_thread():
        return
    try:  # the main thread's id is the process's
        os.setpriority(os.PRIO_PROCESS, os.getpid(), DISPATCH_NICE)
    except OSError:  # not allowed here: left as it is
        pass
