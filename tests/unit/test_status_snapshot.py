"""Status snapshots: `status` reads a snapshot and the journal's tail, and says exactly what a whole
fold says, on local and object-store journals, across reopenings, and when the journal was cut
back or its last folded line edited behind the snapshot's back."""

import json
import uuid

import pytest

from resilient.rundir import RunDir
from resilient.runlog import snapshot
from resilient.runlog.journal import Journal, read_records
from resilient.runlog.snapshot import _from_snapshot, read_status
from resilient.runlog.status import fold

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def often(monkeypatch):
    monkeypatch.setattr(snapshot, "EVERY", 7)


def feed(j: Journal, start: int, n: int) -> None:
    """A job's mix: faults, recoveries, ranks re-formed, progress and checkpoints."""
    for i in range(start, start + n):
        if i % 5 == 0:
            j.append("fault", kind="crash", rank=i % 3, step=i, detected_at=float(i))
            j.append("recovered", recovered_at=i + 0.5, recovery_s=0.5)
            ranks = [{"rank": r, "pid": 100 + i + r, "node": "n"} for r in range(3)]
            j.append("ranks", ranks=ranks)
        j.append("progress", step=i, loss=2.0 - i / 1000, tokens_per_s=10.0)
        j.append("checkpoint", rank=0, tier="memory", step=i)


def test_local_status_is_the_snapshot_plus_the_tail_and_equals_a_whole_fold(tmp_path):
    rd = RunDir(str(tmp_path))
    j = Journal(rd)
    j.append("job", name="x", run_id="r", total_steps=100)
    feed(j, 1, 40)
    j.append("transition", **{"from": "RUNNING", "to": "STOPPING", "cause": "stop"})
    snap = json.loads((tmp_path / "status.json").read_text())
    assert 0 < len(read_records(rd)) - snap["records"] < snapshot.EVERY
    folder, used = _from_snapshot(rd)
    assert used and folder.count == len(read_records(rd))
    assert read_status(rd) == fold(read_records(rd))
    assert read_status(rd)["faults"][-1]["recovery_s"] == 0.5  # a tail record hit a snapshot one


def test_records_appended_together_are_one_write_and_fold_like_single_appends(
    tmp_path, monkeypatch
):
    """`extend` (a poll's `persisted` and `retention`) writes and fsyncs once for all its
    records (three fsyncs a persist on the driver's main thread before); a snapshot due in the
    middle of them records that record's own offset, so status still equals a whole fold."""
    rd = RunDir(str(tmp_path))
    j = Journal(rd)
    j.append("job", name="x", run_id="r", total_steps=100)
    synced = []  # each write of the journal fsyncs (the snapshots' own writes are not counted)
    real = j._write_local
    monkeypatch.setattr(j, "_write_local", lambda data: (synced.append(data), real(data))[1])
    for i in range(1, 15):
        j.extend(
            [
                ("checkpoint", {"rank": 0, "tier": "memory", "step": i}),
                ("persisted", {"step": i, "persisted_at": float(i)}),
                ("retention", {"deleted": [i - 3] if i > 3 else []}),
            ]
        )
    assert len(synced) == 14
    assert len(read_records(rd)) == 1 + 3 * 14
    assert json.loads((tmp_path / "status.json").read_text())["records"] % 3 != 1  # mid-batch
    folder, used = _from_snapshot(rd)
    assert used and read_status(rd) == fold(read_records(rd))
    assert j.extend([]) == []


def test_a_reopened_journal_goes_on_folding_where_the_last_life_stopped(tmp_path):
    rd = RunDir(str(tmp_path))
    j = Journal(rd)
    j.append("job", name="x", run_id="r", total_steps=100)
    feed(j, 1, 12)
    j2 = Journal(rd)
    j2.append("resume", total_steps=100)
    feed(j2, 13, 20)
    assert read_status(rd) == fold(read_records(rd))
    assert read_status(rd)["resumes"] == 1


def test_a_journal_cut_back_or_edited_behind_the_snapshot_is_folded_whole(tmp_path):
    rd = RunDir(str(tmp_path))
    j = Journal(rd)
    j.append("job", name="x", run_id="r", total_steps=100)
    feed(j, 1, 30)
    path = tmp_path / "journal.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:5]))  # a user cut it back (the snapshot covers more)
    assert read_status(rd) == fold(read_records(rd))
    assert not _from_snapshot(rd)[1]
    Journal(rd)  # reopened: far from its snapshot, so it writes a true one
    feed(Journal(rd), 40, 10)
    raw = path.read_bytes()
    end = json.loads((tmp_path / "status.json").read_text())["offset"]
    start = raw.rfind(b"\n", 0, end - 1) + 1
    line = raw[start:end].replace(b'"step": 4', b'"step": 5', 1)
    assert len(line) == end - start and line != raw[start:end]
    path.write_bytes(raw[:start] + line + raw[end:])  # its last folded line, edited
    assert read_status(rd) == fold(read_records(rd))
    assert not _from_snapshot(rd)[1]


def test_object_store_snapshots_cover_only_stored_records():
    rd = RunDir(f"memory://snap-{uuid.uuid4().hex}")
    j = Journal(rd)
    j.append("job", name="x", run_id="r", total_steps=100)
    feed(j, 1, 30)
    assert j.flush(timeout=10)
    snap = json.loads(rd.read_bytes("status.json"))
    assert snap["records"] <= len(read_records(rd)) and snap["offset"] is None
    folder, used = _from_snapshot(rd)
    assert used and folder.count == len(read_records(rd))
    assert read_status(rd) == fold(read_records(rd))
    j2 = Journal(rd)  # a resumed supervisor folds on from what is stored
    j2.append("resume", total_steps=100)
    feed(j2, 31, 10)
    assert j2.flush(timeout=10)
    assert read_status(rd) == fold(read_records(rd))
    assert j2._folder.count == len(read_records(rd))
