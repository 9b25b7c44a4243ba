"""A worker process's output, kept for the supervisor: every line the process writes to its stdout
and stderr (Python `logging`, warnings, tracebacks, and C++/NCCL output alike, since it is caught at
the file descriptor) goes where it went before (Ray's log file on the node) and into a bounded
buffer that the heartbeat drains, so the driver can write it to `logs/rank-N.log`.

Where fd 1/2 are files (Ray's worker logs), a thread tails them: the process writes straight to
the file, so the last lines of a crash (a segfault's traceback, an NCCL abort) are never held in a
pipe that dies with the process. Otherwise (a terminal, a pipe) the fd is teed through a pipe.

Contract: `capture()` installs the capture once per process and returns the process's `LineBuffer`;
it also sends the `resilient` loggers to stderr at INFO. `LineBuffer.drain()` returns the lines
since the last drain (the newest `CAP` when nobody drained for long).
"""

from __future__ import annotations

import collections
import logging
import os
import sys
import threading
import time

CAP = 5000  # lines kept while nobody drains (the newest win)
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineBuffer:
    def __init__(self) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=CAP)
        self._lock = threading.Lock()

    def add(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)

    def feed(self, data: bytes) -> bytes:
        """Add every whole line of `data`; the unfinished rest, to prepend to the next bytes."""
        *lines, rest = data.split(b"\n")
        if len(rest) > 65536:  # a line without an end: cut it
            lines.append(rest)
            rest = b""
        for line in lines:
            self.add(line.decode("utf-8", "replace"))
        return rest

    def drain(self) -> tuple[str, ...]:
        with self._lock:
            out = tuple(self._lines)
            self._lines.clear()
        return out


_BUFFER: LineBuffer | None = None
_LOCK = threading.Lock()


def capture() -> LineBuffer:
    global _BUFFER
    with _LOCK:
        if _BUFFER is None:
            _BUFFER = LineBuffer()
            tailed: set[str] = set()
            for fd in (1, 2):
                path = _file_of(fd)
                if path is None:
                    _tee(fd, _BUFFER)
                elif path not in tailed:  # stdout and stderr often share one file
                    tailed.add(path)
                    threading.Thread(
                        target=tail, args=(path, _BUFFER), daemon=True, name=f"tail-{fd}"
                    ).start()
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(FORMAT))
            log = logging.getLogger("resilient")
            log.addHandler(handler)
            log.setLevel(logging.INFO)
    return _BUFFER


def _file_of(fd: int) -> str | None:
    """The regular file `fd` writes to, or None (Linux /proc; elsewhere always None)."""
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    return path if os.path.isfile(path) else None


def tail(path: str, buf: LineBuffer, every_s: float = 0.5, from_end: bool = True) -> None:
    """Every line appended to `path` from now on (`from_end`; else every line in it), into `buf`
    (a truncated file starts over), until the file is gone."""
    try:
        f = open(path, "rb")
    except OSError:
        return
    with f:
        if from_end:
            f.seek(0, os.SEEK_END)
        pending = b""
        while True:
            chunk = f.read(65536)
            if not chunk:
                try:
                    if os.path.getsize(path) < f.tell():
                        f.seek(0)
                except OSError:  # the file is gone: nothing more will come
                    return
                time.sleep(every_s)
                continue
            pending = buf.feed(pending + chunk)


def _tee(fd: int, buf: LineBuffer) -> None:
    """Point `fd` at a pipe whose reader copies every byte to where `fd` pointed before and every
    line into `buf`."""
    original = os.dup(fd)
    r, w = os.pipe()
    os.dup2(w, fd)
    os.close(w)
    threading.Thread(target=_pump, args=(r, original, buf), daemon=True, name=f"tee-{fd}").start()


def _pump(r: int, original: int, buf: LineBuffer) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(r, 65536)
        except OSError:
            return
        if not chunk:
            return
        try:
            os.write(original, chunk)
        except OSError:  # the node's log file went away: the buffer still gets the lines
            pass
        pending = buf.feed(pending + chunk)
