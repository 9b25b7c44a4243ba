"""SIGTERM and SIGINT as normal events (Slurm, Kubernetes and spot instances preempt with SIGTERM
and a grace period; Ctrl-C is SIGINT).

Contract: `Preemption(grace_s).install()` replaces the handlers (Ray's driver would abort the
process) until `uninstall()`. The first signal asks the job to stop: `stop_reason` names it and
`stop_deadline` is `grace_s` later, by when every rank must have stopped after the same step and
that step be persisted. A second signal raises `Abort` at once (in the main thread, where the
supervisor turns it into a terminal state). `signum` says which signal came first.
`StopRequests(poller, preemption)` is what the supervisor asks: a `resilient stop` or a signal.
"""

from __future__ import annotations

import signal
import time

from resilient.errors import Abort

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preemption:
    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self.at: float | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> Preemption:
        self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def uninstall(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

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

    def take_injects(self) -> list:
        return self.poller.take_injects()

    @property
    def scale_to(self) -> int | None:
        return self.poller.scale_to

    def close(self) -> None:
        self.poller.close()
