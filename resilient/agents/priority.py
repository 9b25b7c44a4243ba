"""Background priority: the threads beside training run on the CPU time the ranks leave.

Why: on a node whose cores the ranks fill, every other thread that wakes up (Ray's signal check in
each actor process, 100 times a second; lease watches, log tails, the node agent's sampler) takes a
core from a rank at once, and the other ranks then wait for it at the next collective: the cost is
paid twice. Lowered, such a thread runs when a rank blocks (ranks block at every collective), and
never preempts one (bench/recovery.py; docs/benchmarks.md).

Contract: `background(tid)` lowers one thread (the calling one by default) to BACKGROUND_NICE; Linux
keeps niceness per thread, so nothing else of the process is lowered, but the threads it starts
afterwards inherit it: only threads that start none that matter are lowered. An unprivileged
process cannot raise a thread back, so a thread that will train is never lowered.
`actor_main_thread()` lowers this Ray actor's main thread: in an actor with concurrency groups it
runs no method, only Ray's periodic signal check. Where the OS refuses or has no per-thread
priority, nothing changes.
"""

from __future__ import annotations

import os
import threading

BACKGROUND_NICE = 19  # still scheduled when the ranks never block (unlike SCHED_IDLE)


def background(tid: int | None = None) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, tid or threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not allowed: normal priority
        pass


def actor_main_thread() -> None:
    """Lower the main thread of this process (its thread id is the process id)."""
    background(os.getpid())
