"""An embedded cluster's processes do not hear the stop signals: a SIGTERM to the launch's whole
process group (`timeout`, `kill -TERM -- -PGID`) or to every process of its control group (systemd's
default `KillMode`, `scancel` without `--batch`) stops the job through the launch alone, which
persists the stop's own step and then ends Ray itself.

Contract: every process Ray starts inside `shielded()` (the GCS, the raylet, their agents, and
through the raylet every worker it will ever start, replacements included) blocks SIGTERM and
SIGINT for its whole life. Ray blocks SIGINT in them by itself (Ctrl-C reaches a terminal's whole
foreground group); SIGTERM it leaves to the raylet and the GCS, which then end on a group's signal
before the ranks finish the stop's step. A signal mask is inherited through fork, kept through
exec, and neither Ray nor Python unblocks it. Only the calling thread is blocked meanwhile: a
signal to the launch itself still reaches it.

`deaf_descendants()`: this process's descendants that block SIGTERM (what `shielded()` started);
`end(procs)` SIGKILLs them and waits up to `wait_s` for them to go. Ray's own shutdown would send
them SIGTERM and wait a second on each before its SIGKILL, and would leave the raylet's agents
running once the raylet was killed. Off Linux (no /proc) nothing is blocked and nothing is deaf.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time

import psutil

BLOCKED = {signal.SIGTERM, signal.SIGINT}


@contextlib.contextmanager
def shielded():
    """Block the stop signals in this thread while Ray's processes start, then restore its mask."""
    if not sys.platform.startswith("linux"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def blocks_sigterm(pid: int) -> bool:
    """Whether process `pid`'s main thread blocks SIGTERM (the mask every thread it starts
    inherits); False for a process gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            line = next(x for x in f if x.startswith("SigBlk:"))
    except (OSError, StopIteration):
        return False
    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)


def deaf_descendants() -> list[psutil.Process]:
    try:
        below = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    return [p for p in below if blocks_sigterm(p.pid)]


def end(procs: list[psutil.Process], wait_s: float = 5.0) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil checks the pid still names the process it listed
    # A killed process is gone within milliseconds; this driver's own children stay zombies until
    # Ray reaps them (psutil.wait_procs would poll the rest for a second and more).
    deadline = time.monotonic() + wait_s
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.01)


def alive(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
