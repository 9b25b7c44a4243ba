"""The primitives that do a fault's damage to a rank's own process (chaos `kill`, `exit`, `hang`,
`node_loss`). Which fault fires when is the chaos controller's business; a worker only calls these.
"""

from __future__ import annotations

import os
import signal

import psutil

PROCESS_DAMAGE = ("kill", "exit", "hang", "node_loss")


def damage(fault: str) -> None:
    """Do `fault` to this very process (SIGKILL, exit 1, SIGSTOP, or its node's raylet killed)."""
    if fault == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "exit":
        os._exit(1)
    elif fault == "hang":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault == "node_loss":
        os.kill(raylet_pid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise ValueError(f"{fault!r} is not a process fault ({', '.join(PROCESS_DAMAGE)})")


def raylet_pid() -> int:
    """The raylet that started this worker: the node this rank lives on."""
    for p in psutil.Process().parents():
        if "raylet" in p.name():
            return p.pid
    raise RuntimeError("no raylet among this worker's parent processes")
