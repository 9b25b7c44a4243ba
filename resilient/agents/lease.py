"""Leases: a worker or node agent cut off from its supervisor ends itself.

Contract, process side: `Lease(expire_s, on_expiry)` holds from its creation; `renew(sent_at)`
extends it by `expire_s` unless the renewal is stale: it took more than MAX_AGE_S longer to
arrive than the fastest renewal of the last WINDOW_S (or two leases' length; a renewal held back
by a partition and delivered after it must not revive a process the job has replaced). Ages are
judged against that fastest one, not against this machine's wall clock, so a node whose clock is
off the supervisor's by seconds (no NTP) keeps its lease; the first renewal, with nothing to
judge it by, holds (the lease is at most `expire_s` old then; the storage fence still refuses a
replaced process's writes), and a step back of the supervisor's wall clock by more than
MAX_AGE_S looks like held-back renewals (NTP slews a running clock; it steps only a far-off one).

A watchdog thread sleeps until the lease's end (on the monotonic clock) and looks again (a renewal
moved the end); once it runs out, `valid()` is False for good (storage writers check it before
every request) and `on_expiry()` runs (the worker and the node agent end their process). A
partitioned node's processes thus stop writing and end `expire_s` after the cut, before the link
can come back, so nothing of theirs reaches the run directory afterwards.

Contract, supervisor side: `LeaseKeeper(actors, every_s)` renews every actor `actors()` returns,
every `every_s`, on a thread of its own (fire and forget: a node that does not answer is the
supervisor's `NodeHealth` business), so the watch loop's pauses never let a lease run out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

MAX_AGE_S = 2.0  # a renewal this much slower to arrive than the fastest recent one is ignored
WINDOW_S = 60.0  # how long a renewal's arrival is the reference (at least the lease's length)


class Lease:
    def __init__(self, expire_s: float, on_expiry: Callable[[], None]):
        self.expire_s, self.on_expiry = expire_s, on_expiry
        self._until = time.monotonic() + expire_s  # a wall-clock jump moves no lease
        self._expired = threading.Event()
        # A window that outlives the lease: once it holds nothing, the lease has run out.
        self._fastest = Fastest(max(WINDOW_S, 2 * expire_s))
        self._lock = threading.Lock()
        threading.Thread(target=self._watch, daemon=True, name="lease").start()

    def renew(self, sent_at: float) -> bool:
        """Extend the lease; False when the renewal came too late (or the lease ran out)."""
        with self._lock:  # renewals come on the lease's thread and with gathers: in order
            now = time.monotonic()
            # How long it took, read off two clocks (this machine's monotonic, the supervisor's
            # wall): its transit plus the clocks' offset, which the fastest recent renewal
            # measures (a step of this machine's wall clock moves neither).
            took = now - sent_at
            fastest = self._fastest.add(now, took)
            if not self.valid() or took - fastest > MAX_AGE_S:  # ran out: for good, even
                return False  # before the watchdog wakes (a stopped process, continued)
            self._until = max(self._until, now + self.expire_s)
        return True

    def valid(self) -> bool:
        return not self._expired.is_set() and time.monotonic() <= self._until

    def _watch(self) -> None:
        while (left := self._until - time.monotonic()) >= 0:  # wakes once a lease, not 4x a second
            time.sleep(left + 0.01)
        self._expired.set()
        log.error(
            "no word from the supervisor for %.1fs: this process is fenced and ends (its node "
            "was lost or cut off; the job goes on without it)",
            self.expire_s,
        )
        self.on_expiry()


class Fastest:
    """The smallest value added in the last `window_s` seconds, in O(1) amortised per `add` (a
    deque whose values rise from front to back: a value with a smaller one after it can never
    be the smallest again)."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._seen: deque[tuple[float, float]] = deque()  # (arrived, value), values rising

    def add(self, at: float, value: float) -> float:
        """Add `value` seen at `at` (monotonic, non-decreasing); the smallest of the window before
        it (`value` itself when the window held nothing)."""
        seen = self._seen
        while seen and seen[0][0] < at - self.window_s:
            seen.popleft()
        smallest = seen[0][1] if seen else value
        while seen and seen[-1][1] >= value:
            seen.pop()
        seen.append((at, value))
        return smallest


class LeaseKeeper:
    def __init__(self, actors: Callable[[], Iterable[object]], every_s: float):
        self.actors, self.every_s = actors, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lease-keeper")

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            now = time.time()
            try:
                actors = list(self.actors())
            except RuntimeError:  # a collection changed while read: next round
                continue
            for a in actors:
                try:
                    a.renew.remote(now)
                except Exception:  # a dead actor: nothing to renew
                    pass

    def close(self) -> None:
        self._stop.set()
