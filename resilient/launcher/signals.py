"""SIGTERM and SIGINT as normal events (Slurm, Kubernetes and spot instances preempt with SIGTERM
and a grace period; Ctrl-C is SIGINT).

Contract: `Preemption(grace_s).install()` replaces the handlers (Ray's driver would abort the
process) until `uninstall()`. The first signal asks the job to stop: `stop_reason` names it and
`stop_deadline` is `grace_s` later, by when every rank must have stopped after the same step and
that step be persisted. A second signal raises `Abort` at once (in the main thread, where the
supervisor turns it into a terminal state). `signum` says which signal came first.

While `at_once()` holds (the supervisor's: no step trained yet that a stop would save), a signal
ends the launch at once instead, from a thread of its own that hears it whatever the main thread
is blocked in (`signal.set_wakeup_fd`): `record_end(reason, True)` (the supervisor journals
STOPPED, or declines when a step was seen meanwhile), then the process exits 128 + the signal. A
start that the signal broke is not waited out: the same signal can end a Ray cluster the user
started beside the launch, and Ray's calls would then hold the launch for a minute before Ray ends
it with exit 1 (a Python handler cannot cut a Ray call short either: Ray runs it inside the call
and goes on). The same thread is the backstop of the main thread's own ending: a second signal
not acted on within BACKSTOP_S, or the grace plus BACKSTOP_S, ends the launch the same way
(`record_end(reason, False)`). Such an end runs `before_exit` (the launcher's: an embedded
cluster's processes ended, since they do not hear the signal; the chaos report written and the
trackers' runs ended, within a few seconds each) after the journal and before the exit.
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
from resilient.launcher.terminal import restore_for_exit

SIGNALS = (signal.SIGTERM, signal.SIGINT)
# A second signal, or the grace's end, that the main thread has not acted on this long after (a
# Ray call holds it: Ray runs a Python handler inside the call and goes on to the call's timeout)
# ends the launch from the signals' thread.
BACKSTOP_S = 5.0
log = logging.getLogger(__name__)


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}
        self.at_once: Callable[[], bool] = lambda: False
        # the supervisor's: journal STOPPED with this reason (only if there is still nothing to
        # save, when told so); False: it declined
        self.record_end: Callable[[str, bool], bool] = lambda reason, only_if_nothing: True
        self.exit_now: Callable[[int], None] = os._exit
        self.before_exit: list[Callable[[], None]] = []  # an end from the signals' thread runs them
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1
        self._heard: list[int] = []  # the signals the signals' thread heard, in order
        self._timers: list[threading.Timer] = []
        self._lock = threading.Lock()  # uninstall() against the signals' thread
        self._closed = False

    def install(self) -> Preemption:
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        r, w = self._pipe = os.pipe()
        os.set_blocking(w, False)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._hear, args=(r,), daemon=True, name="signals").start()
        return self

    def uninstall(self) -> None:
        with self._lock:  # nothing the signals' thread heard ends the process after this
            self._closed = True
            for t in self._timers:
                t.cancel()
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._pipe:
            try:
                if signal.set_wakeup_fd(self._old_fd) != self._pipe[1]:
                    log.warning("the signals' wake-up fd was replaced by another library")
            finally:
                os.close(self._pipe[1])  # the thread reads the end of the pipe and returns
                self._pipe = None

    def _hear(self, r: int) -> None:
        """The signals, as the C handler writes them, however long the main thread is blocked."""
        try:
            while data := os.read(r, 64):
                for signum in data:
                    with self._lock:
                        if signum in SIGNALS and not self._closed:
                            self._heard_one(signum)
        finally:
            os.close(r)

    def _heard_one(self, signum: int) -> None:
        self._heard.append(signum)
        first, name = self._heard[0], signal.Signals(signum).name
        if len(self._heard) == 1:
            if self.at_once():
                self._end_now(
                    first, f"{name} before this launch trained a step: ended at once", True
                )
            why = f"{name}: the grace of supervisor.grace_s={self.grace_s:g}s ran out"
            self._backstop(self.grace_s + BACKSTOP_S, first, why)
        elif len(self._heard) == 2:
            why = f"{name} after {signal.Signals(first).name}: ended at once"
            self._backstop(BACKSTOP_S, first, why)

    def _backstop(self, after_s: float, signum: int, reason: str) -> None:
        t = threading.Timer(after_s, self._fire, (signum, reason))
        t.daemon = True
        self._timers.append(t)
        t.start()

    def _fire(self, signum: int, reason: str) -> None:
        with self._lock:  # a backstop that fired as uninstall() cancelled it does nothing
            if not self._closed:
                self._end_now(signum, reason, False)

    def _end_now(self, signum: int, reason: str, only_if_nothing_to_save: bool) -> None:
        """Journal the end (the supervisor may decline one with nothing to save no more: then it
        returns) and exit 128 + the first signal, the terminal's descriptors restored first (they
        point at the capture file during the launch)."""
        try:
            if not self.record_end(reason, only_if_nothing_to_save):
                return
        except Exception:  # storage is down: the run is resumed from what it holds anyway
            log.warning("the stop was not journalled", exc_info=True)
        for end in self.before_exit:
            try:
                end()
            except Exception:
                log.warning("%s failed before the exit", end, exc_info=True)
        restore_for_exit()
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

    @property
    def signalled(self) -> bool:
        """A signal came (what it breaks, such as an embedded Ray, is the stop's doing)."""
        return self.preemption.signum is not None

    def end_at_once_while(
        self, nothing_to_save: Callable[[], bool], record_end: Callable[[str, bool], bool]
    ) -> None:
        """A stop signal ends the launch at once while `nothing_to_save()` holds, and a stop
        that the main thread does not end in time is ended from the signals' thread (see the
        module contract); `record_end(reason, only_if_nothing_to_save)` journals it first."""
        self.preemption.at_once, self.preemption.record_end = nothing_to_save, record_end

    def take_injects(self) -> list:
        return self.poller.take_injects()

    @property
    def scale_to(self) -> int | None:
        return self.poller.scale_to

    def close(self) -> None:
        self.poller.close()
