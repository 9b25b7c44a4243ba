"""Retention keeps the best checkpoints by eval loss: pure, and in the persister across commits
and re-listings, where each step's manifest is read at most once (`ckpt export --best` and its
refusals: test_export_merge)."""

import time

import pytest

from resilient.checkpoint.memory import Entry, MemoryTier
from resilient.checkpoint.persister import Persister
from resilient.checkpoint.retention import best, doomed
from resilient.checkpoint.storage import CheckpointStore, make_manifest
from resilient.rundir import RunDir

pytestmark = pytest.mark.timeout(60)


def test_doomed_keeps_the_best_scored_beside_the_newest():
    steps = [10, 20, 30, 40, 50]
    scores = {10: 2.0, 20: 1.0, 30: 1.5, 40: 1.0}  # 50 was not evaluated
    assert doomed(steps, keep=1, keep_best=1, scores=scores) == [10, 30, 40]  # ties: earlier
    assert doomed(steps, keep=1, keep_best=2, scores=scores) == [10, 30]
    assert doomed(steps, keep=2, keep_best=0, scores=scores) == [10, 20, 30]
    assert doomed(steps, keep=1, keep_best=3, scores={99: 0.1}) == [10, 20, 30, 40]
    assert best(scores) == 20 and best({}) is None
    # with keep_every; a NaN (a diverged evaluation) is no score; more best than scored steps
    assert doomed(steps, keep=1, keep_every=30, keep_best=1, scores={10: 0.1}) == [20, 40]
    assert doomed(steps, keep=1, keep_best=1, scores={10: float("nan"), 20: 9.0}) == [10, 30, 40]
    assert doomed(steps, keep=1, keep_best=9, scores={30: 1.0}) == [10, 20, 40]
    assert best({10: float("nan")}) is None and doomed([], keep=1, keep_best=1) == []


def _entry(step: int, loss: float | None) -> Entry:
    files = {"a.bin": bytes([step % 256]) * 8}
    extra = {"eval": {"loss": loss}} if loss is not None else {}
    return Entry(
        step, files, make_manifest(step, files, "fp", **extra), role="memory", persist=True
    )


def test_the_persister_keeps_the_best_through_commits_and_a_relisting(tmp_path):
    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    reads = []
    read = store.eval_loss
    store.eval_loss = lambda s: reads.append(s) or read(s)
    tier = MemoryTier(keep=2, max_pending=16)
    p = Persister(tier, store, keep=1, keep_every=0, keep_best=1)
    for step, loss in ((5, None), (10, 3.0), (15, None), (20, 1.0), (25, None), (30, 2.0)):
        tier.put(_entry(step, loss))
        assert p.wait_persisted(step, 10)
    _until(lambda: store.steps() == [20, 30])  # the newest, and the best (step 10 lost its place)
    _until(lambda: p.scores == {20: 1.0, 30: 2.0})  # bounded by what storage holds
    assert reads == []  # its own commits: the losses came with their manifests
    p.protect(set())  # a restart: the next retention lists storage again, reading what it lacks
    p.scores.clear()  # (as a new process would start)
    tier.put(_entry(35, 5.0))
    assert p.wait_persisted(35, 10)
    _until(lambda: store.steps() == [20, 35])
    assert sorted(reads) == [20, 30]  # each listed step once; 35 is its own commit
    p.protect(set())
    tier.put(_entry(40, 0.5))
    assert p.wait_persisted(40, 10)
    _until(lambda: store.steps() == [40])  # the newest is also the best
    _until(lambda: p.scores == {40: 0.5})
    assert sorted(reads) == [20, 30]  # known steps are not read again


def test_the_persister_without_keep_best_reads_no_manifest(tmp_path):
    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    store.eval_loss = lambda s: pytest.fail(f"read the manifest of step {s}")
    tier = MemoryTier(keep=2, max_pending=16)
    p = Persister(tier, store, keep=1, keep_every=0)
    for step, loss in ((1, 0.1), (2, 3.0), (3, 2.0)):
        tier.put(_entry(step, loss))
        assert p.wait_persisted(step, 10)
        p.protect(set())  # re-list every time
    _until(lambda: store.steps() == [3])
    assert not [e for e in p.drain_events() if e["event"] == "retention_error"]


def _until(done) -> None:
    """Await a state of storage that retention reaches after a commit."""
    deadline = time.monotonic() + 10
    while not done():
        assert time.monotonic() < deadline, "retention did not get there"
        time.sleep(0.01)
