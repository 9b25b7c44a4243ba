"""The launch's terminal is the job's.

Contract: `with Terminal() as term:` points this process's file descriptors 1 and 2 at a capture
file for the duration, so whatever else writes there (Ray's C++ warnings, its worker-death notices
printed by its error listener, a raylet's stack trace, other libraries' warnings) never reaches the
terminal; `term.out` / `term.err` are streams on the original descriptors, for the launcher's own
progress line, summary and messages, and the `resilient` loggers' warnings go to `term.err` too.
Every captured line is in `term.lines` (a bounded `LineBuffer`, drained by `RayNotes`, which puts
them in the run's logs: `logs/driver.log`, `resilient logs RUN_DIR --driver`). On exit the
descriptors are restored; an exception leaving the block is printed on the terminal as usual.
`restore_for_exit()` does that restoring from any thread, for a process about to `os._exit` (the
signals' thread ending the launch at once).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time

from resilient.agents.output import LineBuffer, tail
from resilient.rundir.layout import DRIVER_LOG
from resilient.runlog.journal import JournalLost
from resilient.runlog.ranklogs import RankLogs

_ACTIVE: list[Terminal] = []  # the Terminal in force (restore_for_exit restores it)


def restore_for_exit() -> None:
    """The original descriptors back and the capture file removed, from any thread: the process
    exits next, without leaving the `with` block."""
    for term in list(_ACTIVE):
        term.restore()


class Terminal:
    def __enter__(self) -> Terminal:
        sys.stdout.flush()
        sys.stderr.flush()
        self._restore_lock, self._restored = threading.Lock(), False
        self._dir = tempfile.mkdtemp(prefix="resilient-driver-")
        path = os.path.join(self._dir, "driver.log")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._saved = (os.dup(1), os.dup(2))
        self.out = os.fdopen(os.dup(1), "w", buffering=1, errors="replace")
        self.err = os.fdopen(os.dup(2), "w", buffering=1, errors="replace")
        self.lines = LineBuffer()
        threading.Thread(
            target=tail, args=(path, self.lines, 0.2, False), daemon=True, name="tail-driver"
        ).start()
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self._handler = logging.StreamHandler(self.err)
        self._handler.setLevel(logging.WARNING)
        self._handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logging.getLogger("resilient").addHandler(self._handler)
        _ACTIVE.append(self)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        logging.getLogger("resilient").removeHandler(self._handler)
        self.restore()
        for stream in (self.out, self.err):
            stream.flush()
            stream.close()

    def restore(self) -> None:
        """Descriptors 1 and 2 back on the terminal, the capture file removed (once)."""
        with self._restore_lock:
            if self._restored:
                return
            self._restored = True
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, saved in zip((1, 2), self._saved, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            shutil.rmtree(self._dir, ignore_errors=True)
            _ACTIVE.remove(self)


NOTABLE = re.compile(
    r"\(raylet\)|worker died|was killed|SYSTEM_ERROR|marked dead|is dead|StackTrace|"
    r"out of memory|OOM",
    re.IGNORECASE,
)
NOTES_PER_MIN = 20  # journalled notable lines a minute at most (a storm is in the log whole)
PUMP_S = 1.0


class RayNotes:
    """The driver's captured lines (`Terminal.lines`) into the run's logs (`logs/driver.log`), the
    notable ones (worker deaths, dead nodes, stack traces, out of memory) also journalled as
    `ray_notice` records, at most NOTES_PER_MIN a minute: evidence beside the faults they explain.
    A thread of its own; `close()` takes the rest."""

    def __init__(self, lines: LineBuffer, rundir, journal):
        self.lines, self.journal = lines, journal
        self.logs = RankLogs(rundir)
        self._minute, self._noted = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="ray-notes")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(PUMP_S):
            self._pump()

    def _pump(self) -> None:
        lines = self.lines.drain()
        if not lines:
            return
        self.logs.append(DRIVER_LOG, lines)
        minute = int(time.time() // 60)
        if minute != self._minute:
            self._minute, self._noted = minute, 0
        for line in lines:
            if self._noted < NOTES_PER_MIN and NOTABLE.search(line):
                self._noted += 1
                try:
                    self.journal.append("ray_notice", line=line[:500])
                except JournalLost:  # the launch ends on it and says so; the line is in the log
                    return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._pump()
        self.logs.close()
