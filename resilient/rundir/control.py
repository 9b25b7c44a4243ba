"""Requests to a running job, left in its run directory's `control/` folder.

Contract: `resilient stop` calls `request_stop()`, `resilient chaos inject` calls `write_inject()`,
`resilient scale` calls `request_scale()`; the job's `ControlPoller` looks for all three every
`every_s` on a thread of its own, so whoever acts on them (the supervisor, the chaos controller)
never waits on storage, which may be down. Each inject request is handed out once by
`take_injects()` and deleted from storage when taken; the newest scale request stays (`scale_to`),
so a resumed run keeps the size it was asked for.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

from resilient.rundir.fs import RunDir
from resilient.rundir.layout import CONTROL, SCALE_FILE, STOP_FILE, inject_request

INJECT_PREFIX = "inject-"


@dataclass(frozen=True)
class InjectRequest:
    """`resilient chaos inject`: a catalogue fault aimed at a rank or a node, with its
    parameters."""

    id: str
    fault: str
    rank: int | None = None
    node: int | None = None
    params: dict = field(default_factory=dict)


def request_stop(rundir: RunDir) -> None:
    rundir.write_json(STOP_FILE, {"requested_at": time.time()})


def request_scale(rundir: RunDir, workers: int) -> None:
    """Ask the running job to go on with `workers` ranks (within min_workers..num_workers)."""
    rundir.write_json(SCALE_FILE, {"workers": workers, "requested_at": time.time()})


def read_scale(rundir: RunDir) -> int | None:
    """The number of ranks `resilient scale` asked for, None if never asked."""
    if not rundir.exists(SCALE_FILE):
        return None
    return int(rundir.read_json(SCALE_FILE)["workers"])


def clear_stop(rundir: RunDir) -> None:
    """Forget a stop request (a resumed run is not ended by the stop that ended its last life)."""
    rundir.remove(STOP_FILE)


def write_inject(
    rundir: RunDir, fault: str, rank: int | None, node: int | None, params: dict
) -> str:
    """Leave an inject request for the running job; returns its id."""
    req_id = uuid.uuid4().hex[:12]
    body = {"fault": fault, "rank": rank, "node": node, "params": params}
    rundir.write_json(inject_request(req_id), body)
    return req_id


def cancel_inject(rundir: RunDir, req_id: str) -> None:
    rundir.remove(inject_request(req_id))


def pending_injects(rundir: RunDir) -> list[InjectRequest]:
    """The inject requests waiting in `control/` (half-written ones wait for the next look)."""
    out = []
    for name in rundir.listdir(CONTROL):
        if name.startswith(INJECT_PREFIX) and name.endswith(".json"):
            req_id = name[len(INJECT_PREFIX) : -len(".json")]
            try:
                body = rundir.read_json(inject_request(req_id))
            except (OSError, ValueError):
                continue
            out.append(
                InjectRequest(
                    req_id,
                    body["fault"],
                    body.get("rank"),
                    body.get("node"),
                    body.get("params") or {},
                )
            )
    return out


class ControlPoller:
    """Looks for a stop request and inject requests in the background (see the module contract)."""

    def __init__(self, rundir: RunDir, every_s: float = 1.0):
        self.rundir, self.every_s = rundir, every_s
        self._stop_seen = False
        self.scale_to: int | None = None  # the newest `resilient scale` request
        self._requests: list[InjectRequest] = []
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> ControlPoller:
        threading.Thread(target=self._loop, daemon=True, name="control").start()
        return self

    @property
    def stop_requested(self) -> bool:
        return self._stop_seen

    def take_injects(self) -> list[InjectRequest]:
        with self._lock:
            out, self._requests = self._requests, []
        return out

    def close(self) -> None:
        self._closed.set()

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                self._stop_seen = self._stop_seen or self.rundir.exists(STOP_FILE)
                self.scale_to = read_scale(self.rundir)
                for req in pending_injects(self.rundir):
                    cancel_inject(self.rundir, req.id)  # taken: never carried out twice
                    with self._lock:
                        self._requests.append(req)
            except Exception:  # storage outage: ask again next time
                pass
            self._closed.wait(self.every_s)
