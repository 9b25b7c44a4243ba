"""Releasing the job's placement groups: every group is removed, and a shutdown's release is
bounded (a signal to the whole process group can end an embedded cluster's GCS with the driver:
Ray then holds the removal for a minute and ends the process, exit 1, instead of 143)."""

import threading
import time

import pytest

from resilient.agents import reservation
from resilient.config import validate_tree

pytestmark = pytest.mark.timeout(30)


def make(tmp_path) -> reservation.Reservation:
    spec = validate_tree(
        {"name": "u", "data": {"path": str(tmp_path / "c.txt")}, "cluster": {"num_workers": 2}}
    )
    r = reservation.Reservation(spec)
    r.groups = {False: "ranks", True: "spares"}
    return r


def test_release_removes_every_group(tmp_path, monkeypatch):
    removed = []
    monkeypatch.setattr(reservation, "remove_placement_group", removed.append)
    r = make(tmp_path)
    r.release()
    assert sorted(removed) == ["ranks", "spares"] and not r.groups


def test_a_bounded_release_returns_while_ray_holds_the_call(tmp_path, monkeypatch):
    held = threading.Event()
    monkeypatch.setattr(reservation, "remove_placement_group", lambda g: held.wait(20))
    r = make(tmp_path)
    t0 = time.monotonic()
    try:
        r.release(wait_s=0.2)
        assert time.monotonic() - t0 < 2.0 and not r.groups
    finally:
        held.set()
