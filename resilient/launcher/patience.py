"""Waiting out a storage outage where the launcher must read the run directory (a resume).

Contract: `patiently(what, fn, console, timeout)` returns `fn()`, calling it again every few
seconds while it fails with a storage error (an outage: refused or reset connections, timeouts, 5xx
answers); it says so once on the console (and again every 30 s) and raises `StorageUnavailable`
after `timeout`. A missing file or a refused permission is not an outage: it is raised at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from rich.console import Console

from resilient.rundir.fs import is_outage

T = TypeVar("T")
RETRY_S, SAY_EVERY_S = 2.0, 30.0


class StorageUnavailable(Exception):
    """Storage did not answer within the time the launcher waits for it."""


def patiently(what: str, fn: Callable[[], T], console: Console, timeout: float = 300.0) -> T:
    deadline, said = time.time() + timeout, 0.0
    while True:
        try:
            return fn()
        except Exception as e:
            if not is_outage(e):
                raise
            if time.time() > deadline:
                raise StorageUnavailable(
                    f"storage did not answer for {timeout:g}s while trying to {what} "
                    f"({type(e).__name__}: {str(e)[:200]}); the run is intact: try again later"
                ) from None
            if time.time() - said >= SAY_EVERY_S:
                said = time.time()
                console.print(
                    f"storage unreachable ({type(e).__name__}: {str(e)[:120]}); "
                    f"waiting to {what}...",
                    highlight=False,
                )
        time.sleep(RETRY_S)
