"""Fencing (no Ray): a process whose lease runs out stops writing and ends; a stale renewal (held
back by a partition) revives nothing; a fenced persister and retention make no storage request;
object-store sockets give up on a dead link in the kernel."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from resilient.agents.lease import MAX_AGE_S, Fastest, Lease, LeaseKeeper
from resilient.checkpoint.memory import Entry, MemoryTier
from resilient.checkpoint.persister import Persister
from resilient.checkpoint.storage import CheckpointStore, Fenced, make_manifest
from resilient.rundir import RunDir
from resilient.rundir.fs import TCP_USER_TIMEOUT_MS, storage_socket, with_s3_defaults

pytestmark = pytest.mark.timeout(60)


def test_a_lease_runs_out_without_renewals_and_a_stale_renewal_is_refused():
    ended = threading.Event()
    lease = Lease(0.6, ended.set)
    for _ in range(4):  # renewed: it holds past its first expiry
        time.sleep(0.25)
        assert lease.renew(time.time()) and lease.valid()
    assert not lease.renew(time.time() - MAX_AGE_S - 1)  # sent long ago: a partition's backlog
    assert ended.wait(5) and not lease.valid()
    assert not lease.renew(time.time())  # once out, out for good


@pytest.mark.parametrize("skew", [-30.0, 30.0])
def test_a_node_whose_clock_is_off_keeps_its_lease_and_still_refuses_a_stale_renewal(skew):
    """The supervisor's clock `skew` seconds ahead of this node's (no NTP): its renewals look
    30 s old, or sent in the future, on arrival; a held-back one is still told apart."""
    ended = threading.Event()
    lease = Lease(1.5, ended.set)
    for _ in range(4):  # renewed past its first expiry, whatever the offset
        time.sleep(0.5)
        assert lease.renew(time.time() + skew) and lease.valid()
    assert not lease.renew(time.time() + skew - MAX_AGE_S - 1)  # a partition's backlog
    assert lease.renew(time.time() + skew)
    assert ended.wait(5) and not lease.valid()


def test_fastest_is_the_smallest_of_its_window():
    f = Fastest(10.0)
    assert f.add(0.0, 5.0) == 5.0  # alone: itself
    assert f.add(1.0, 7.0) == 5.0
    assert f.add(2.0, 6.0) == 5.0
    assert f.add(10.5, 9.0) == 6.0  # 5.0 (at 0.0) left the window; 7.0 had a smaller one after it
    assert f.add(12.5, 9.0) == 9.0  # 6.0 (at 2.0) left too
    assert f.add(100.0, 1.0) == 1.0  # an empty window: itself
    assert len(f._seen) == 1


def test_a_lease_past_its_end_refuses_a_renewal_before_its_watchdog_wakes():
    """A stopped process continued after its lease's end: a renewal handled before the watchdog
    (which sleeps until the end) runs must not revive it."""
    ended = threading.Event()
    # 2 s: the watchdog sleeps through the checks below, and runs out within this test (a 30 s
    # one ran out in whichever test came 30 s later, logging its fencing error there)
    lease = Lease(2.0, ended.set)
    lease._until = time.monotonic() - 0.1  # as if stopped for longer than the lease
    assert not lease.valid() and not lease.renew(time.time())
    assert not lease.valid()
    assert not ended.is_set()  # refused before the watchdog woke
    assert ended.wait(5)  # and it ends here, not in a later test


def test_the_keeper_renews_every_actor_it_is_given():
    got = []

    class Method:
        def remote(self, sent_at):
            got.append(sent_at)

    class Actor:
        renew = Method()

    keeper = LeaseKeeper(lambda: [Actor(), Actor()], 0.05).start()
    try:
        deadline = time.time() + 5
        while len(got) < 4 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        keeper.close()
    assert len(got) >= 4 and all(abs(t - time.time()) < 5 for t in got)


def _entry(step: int) -> Entry:
    files = {"shared.safetensors": b"x" * 100, "meta.json": b"{}"}
    return Entry(step, files, make_manifest(step, files, "fp"), role="memory", persist=True)


def test_a_fenced_writer_makes_no_request(tmp_path):
    rundir = RunDir(str(tmp_path / "run"))
    store = CheckpointStore(rundir)
    with pytest.raises(Fenced):
        store.commit(_entry(5).files, _entry(5).manifest, may_write=lambda: False)
    assert not (tmp_path / "run").exists()  # not even the first file
    store.commit(_entry(5).files, _entry(5).manifest)
    store.commit(_entry(6).files, _entry(6).manifest)
    with pytest.raises(Fenced):
        store.retain(1, steps=[5, 6], may_write=lambda: False)
    assert store.steps() == [5, 6]  # retention deleted nothing


def test_a_persister_whose_lease_ran_out_stops(tmp_path):
    valid = threading.Event()
    valid.set()
    tier = MemoryTier(keep=4, max_pending=4)
    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    persister = Persister(tier, store, keep=10, keep_every=0, may_write=valid.is_set)
    tier.put(_entry(1))
    assert persister.wait_persisted(1, 10)
    valid.clear()  # the lease ran out: nothing more reaches storage
    tier.put(_entry(2))
    assert not persister.wait_persisted(2, 1.5)
    assert store.steps() == [1]


def test_an_upload_a_rollback_abandoned_midway_is_undone(tmp_path):
    """The agent forgets a snapshot (a rollback) while the persister commits it: the commit is
    deleted again and reported `abandoned`, never `persisted`."""
    tier = MemoryTier(keep=4, max_pending=4)
    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    committing, forgotten = threading.Event(), threading.Event()
    real = store.commit

    def slow_commit(*args, **kwargs):
        committing.set()
        assert forgotten.wait(10)
        return real(*args, **kwargs)

    store.commit = slow_commit
    persister = Persister(tier, store, keep=10, keep_every=0)
    tier.put(_entry(1))
    assert committing.wait(10)
    assert tier.forget_after(0) == [1]  # the rollback, mid-upload
    forgotten.set()
    deadline = time.time() + 10
    while not any(e["event"] == "abandoned" for e in persister._events) and time.time() < deadline:
        time.sleep(0.05)
    kinds = [e["event"] for e in persister.drain_events()]
    assert "abandoned" in kinds and "persisted" not in kinds
    assert store.steps() == [] and not persister.wait_persisted(1, 0.1)


def test_object_store_sockets_give_up_on_a_dead_link():
    sock = storage_socket((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 1)))
    try:
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            got = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
            assert got == TCP_USER_TIMEOUT_MS
    finally:
        sock.close()
    opts = with_s3_defaults("s3://b/run", {"config_kwargs": {"connector_args": {"ttl": 1}}})
    connector = opts["config_kwargs"]["connector_args"]
    assert connector["socket_factory"] is storage_socket and connector["ttl"] == 1
    assert with_s3_defaults("file:///tmp/x", {}) == {}


def test_a_writer_of_an_earlier_generation_commits_and_deletes_nothing(tmp_path):
    from resilient.rundir.layout import FENCE

    rundir = RunDir(str(tmp_path / "run"))
    store = CheckpointStore(rundir)
    store.commit(_entry(5).files, _entry(5).manifest, generation=lambda: 0)  # no fence yet
    rundir.write_json(FENCE, {"generation": 1})  # the supervisor wrote a node off
    with pytest.raises(Fenced, match="stale writer"):
        store.commit(_entry(6).files, _entry(6).manifest, generation=lambda: 0)
    assert store.steps() == [5]  # its manifest never landed
    store.commit(_entry(6).files, _entry(6).manifest, generation=lambda: 1)  # the live ones
    with pytest.raises(Fenced):
        store.retain(1, steps=[5, 6], generation=lambda: 0)
    assert store.steps() == [5, 6]  # nothing deleted
    tier = MemoryTier(keep=4, max_pending=4)
    zombie = Persister(tier, store, keep=10, keep_every=0, generation=lambda: 0)
    tier.put(_entry(7))
    assert not zombie.wait_persisted(7, 1.5) and store.steps() == [5, 6]
    assert any(e["event"] == "fenced" for e in zombie.drain_events())
