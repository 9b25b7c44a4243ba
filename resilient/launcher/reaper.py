"""The embedded cluster's processes end with the launch, also when it is SIGKILLed.

A launch that closes its cluster ends Ray's processes itself (`Connection.close`, `end_now`). One
that is SIGKILLed (`kill -9`, the OOM killer, a drill that kills the driver) cannot, and those
processes outlive it: they block SIGTERM (`shield`), and Ray's agents do not end with the raylet.
A `--resume` then starts a second cluster beside the first one's remains.

Contract: `Reaper.start(procs)` starts one small process in a session of its own (a signal to the
launch's process group does not reach it) that is told `procs` (pid and start time) and then
waits on a pipe from the launch. The pipe ends when the launch ends, however it ends: without
`done()` first, the reaper SIGKILLs each of `procs` that is still the process it was told of, and
every descendant of them, then exits. `done()` (the launch ended its cluster itself) lets it exit
touching nothing. It blocks SIGTERM and SIGINT from its start (`shield`): it ends when the launch
does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import psutil

DONE = b"done\n"


class Reaper:
    def __init__(self, proc: subprocess.Popen):
        self.proc = proc

    @classmethod
    def start(cls, procs: list[psutil.Process]) -> Reaper | None:
        """A reaper told of `procs`; None where it could not start (the launch goes on: only a
        SIGKILLed launch needed it)."""
        told = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                told.append(f"{p.pid} {p.create_time()!r}\n")
        from resilient.launcher.shield import shielded  # (not in the reaper's own process)

        try:
            with shielded():  # deaf from its first instruction: a signal cannot race its start
                proc = subprocess.Popen(
                    # by path, isolated: the standard library and psutil only, not the package
                    [sys.executable, "-I", os.path.abspath(__file__)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            proc.stdin.write("".join(told).encode() + b"\n")
            proc.stdin.flush()
        except OSError:
            return None
        return cls(proc)

    def done(self, wait_s: float = 2.0) -> None:
        """The cluster is ended: the reaper exits touching nothing."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(DONE)
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(wait_s)


def _same(pid: int, created: float) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 0.01 else None
    except psutil.Error:
        return None


def main() -> None:
    stdin = sys.stdin.buffer
    told = []
    for line in iter(stdin.readline, b"\n"):
        if not line:  # the launch died before it finished telling
            break
        pid, created = line.split()
        told.append((int(pid), float(created)))
    rest = stdin.read()  # blocks until the launch closes the pipe or dies
    if rest.startswith(DONE):
        return
    procs = [p for p in (_same(pid, created) for pid, created in told) if p is not None]
    for p in list(procs):
        with contextlib.suppress(psutil.Error):
            procs += p.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


if __name__ == "__main__":
    main()
