"""SIGTERM and SIGINT as normal events (Slurm, Kubernetes and spot instances preempt with SIGTERM
and a grace period; Ctrl-C is SIGINT).

Contract: `Preemption(grace_s).install()` replaces the handlers (Ray's driver would abort the
process) until `uninstall()`. The first signal asks the job to stop: `stop_reason` names it and
`stop_deadline` is `grace_s` later, by when every rank must have stopped after the same step and
that step be persisted. A second signal raises `Abort` at once (in the main thread, where the
supervisor turns it into a terminal state). `signum` says which signal came first.

While `at_once()` holds (the supervisor's: no step trained yet that a stop would save), a signal
ends the launch at once instead, from a thread of its own that hears it whatever the main thread
is blocked in (`signal.set_wakeup_fd`): `record_end(reason)` (the supervisor journals STOPPED),
then the process exits 128 + the signal. A start that the signal broke is not waited out: a
process group's SIGTERM ends an embedded Ray too, and Ray's calls would then hold the launch for a
minute before Ray ends it with exit 1 (a Python handler cannot cut a Ray call short either).
`StopRequests(poller, preemption)` is what the supervisor asks: a `resilient stop` or a signal.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from resilient.errors import Abort

SIGNALS = (signal.SIGTERM, signal.SIGINT)
log = logging.getLogger(__name__)


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}
        self.at_once: Callable[[], bool] = lambda: False
        self.record_end: Callable[[str], None] = lambda reason: None
        self.exit_now: Callable[[int], None] = os._exit
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1

    def install(self) -> Preemption:
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        r, w = self._pipe = os.pipe()
        os.set_blocking(w, False)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._hear, args=(r,), daemon=True, name="signals").start()
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._pipe:
            signal.set_wakeup_fd(self._old_fd)
            os.close(self._pipe[1])  # the thread reads the end of the pipe and returns
            self._pipe = None

    def _hear(self, r: int) -> None:
        """The signals, as the C handler writes them, however long the main thread is blocked."""
        try:
            while data := os.read(r, 64):
                for signum in data:
                    if signum in SIGNALS and self.at_once():
                        self._end_now(signum)
        finally:
            os.close(r)

    def _end_now(self, signum: int) -> None:
        name = signal.Signals(signum).name
        reason = f"{name} before this launch trained a step: ended at once"
        try:
            self.record_end(reason)
        except Exception:  # storage is down: the run is resumed from what it holds anyway
            log.warning("the stop was not journalled", exc_info=True)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[?25h")  # the progress line's hidden cursor, shown again
            sys.stdout.flush()
        print(f"\nSTOPPED: {reason}", file=sys.stderr, flush=True)
        self.exit_now(128 + signum)

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _on_signal(self, signum: int, frame) -> None:
        if self.signum is not None:
            name = signal.Signals(signum).name
            raise Abort(f"{name} after {self.name}: ended at once", self.signum)
        self.signum, self.at = signum, time.time()

    @property
    def stop_reason(self) -> str | None:
        if self.signum is None:
            return None
        return f"{self.name} (preemption)"

    @property
    def stop_deadline(self) -> float | None:
        return self.at + self.grace_s if self.at is not None else None


class StopRequests:
    """A `resilient stop` (the control poller) or a signal, whichever came first."""

    def __init__(self, poller, preemption: Preemption):
        self.poller, self.preemption = poller, preemption

    @property
    def stop_reason(self) -> str | None:
        if self.preemption.stop_reason:
            return self.preemption.stop_reason
        return "resilient stop" if self.poller.stop_requested else None

    @property
    def stop_deadline(self) -> float | None:
        return self.preemption.stop_deadline

    def end_at_once_while(
        self, nothing_to_save: Callable[[], bool], record_end: Callable[[str], None]
    ) -> None:
        """A stop signal ends the launch at once while `nothing_to_save()` holds (see the
        module contract); `record_end(reason)` journals it first."""
        self.preemption.at_once, self.preemption.record_end = nothing_to_save, record_end

    def take_injects(self) -> list:
        return self.poller.take_injects()

    @property
    def scale_to(self) -> int | None:
        return self.poller.scale_to

    def close(self) -> None:
        self.poller.close()
