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


@pytest.fixture
def connected(monkeypatch):
    """Ray as if connected: a real Ray call without a connection would start a local Ray."""
    monkeypatch.setattr(reservation.ray, "is_initialized", lambda: True)


def test_release_removes_every_group(tmp_path, monkeypatch, connected):
    removed = []
    monkeypatch.setattr(reservation, "remove_placement_group", removed.append)
    r = make(tmp_path)
    r.release()
    assert sorted(removed) == ["ranks", "spares"] and not r.groups


def test_a_bounded_release_returns_while_ray_holds_the_call(tmp_path, monkeypatch, connected):
    held, removed = threading.Event(), []

    def remove(g):
        held.wait(20)
        removed.append(g)

    monkeypatch.setattr(reservation, "remove_placement_group", remove)
    r = make(tmp_path)
    t0 = time.monotonic()
    try:
        r.release(wait_s=0.2)
        assert time.monotonic() - t0 < 2.0 and not r.groups
    finally:
        held.set()
        while len(removed) < 2:  # the release's thread ends before the fakes are undone
            time.sleep(0.01)


def test_a_release_after_shutdown_never_calls_ray(tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(reservation.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(reservation, "remove_placement_group", called.append)
    make(tmp_path).release()
    assert not called
