"""Where an agent's threads stand in the CPU's queue (Linux keeps policy and niceness per thread).

Contract: `idle_this_thread()` puts the calling thread at idle priority (a spare's warm-up: it runs
on CPU time the ranks leave unused); `lower_main_thread()`, called from any method of a threaded
actor, lowers the process's main thread alone by LOWER_BY niceness levels (`below`: 19, the
lowest, at most). Neither touches another thread, and neither can be undone by an unprivileged
process: the thread that will train (started from one of the actor's pool threads) keeps normal
priority. Normal is whatever niceness the process was started at (a runner may start everything
at -10): lowering is relative to it, so the weights below hold at any base.
"""

from __future__ import annotations

import os
import sys
import threading

# In a threaded Ray actor the main thread only hands each call to a pool thread and, on a 10 ms
# timer of Ray's own (no setting), takes the GIL to check for signals. At normal priority each of
# those 100 wakeups a second, in every rank, spare and node agent, could preempt a training
# thread (a rank's was preempted ~500 times a second, plain DDP's ~130); 19 levels lower they wait
# for a core to go idle, as one does every step when a rank waits on its peers. It still gets its
# share (~1.4% of a contended core, several times what it uses), so a call waits a few
# milliseconds at most (heartbeats, leases and hang timeouts are in seconds). An absolute 19 from
# a base of -10 would leave it ~0.16%.
LOWER_BY = 19


def below(nice: int) -> int:
    """The niceness LOWER_BY levels below `nice` (19, the lowest there is, at most)."""
    return min(19, nice + LOWER_BY)


def lowered() -> int:
    """The niceness LOWER_BY levels below the calling thread's own."""
    return below(os.getpriority(os.PRIO_PROCESS, 0))  # 0: the calling thread, on Linux


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


_lowering = threading.Lock()
_main_lowered = False


def lower_main_thread() -> None:
    """This process's main thread alone LOWER_BY levels below the calling (pool) thread, at the
    first call (a later one changes nothing). Call it from an actor's method (a pool thread),
    never from `__init__`: Ray starts the actor's pool threads from the main thread once
    `__init__` has returned, and a thread inherits its creator's niceness (the training thread,
    started from a pool thread, keeps normal priority). Nothing off Linux, where niceness is the
    whole process's, nor on the main thread itself (a plain actor works there)."""
    global _main_lowered
    if sys.platform != "linux" or threading.current_thread() is threading.main_thread():
        return
    with _lowering:
        # Once: a thread started from the main thread after it was lowered inherits that, and
        # lowering from it would push the main thread further (to 19).
        if _main_lowered:
            return
        _main_lowered = True
        try:  # the main thread's id is the process's
            os.setpriority(os.PRIO_PROCESS, os.getpid(), lowered())
        except OSError:  # not allowed here: left as it is
            pass
