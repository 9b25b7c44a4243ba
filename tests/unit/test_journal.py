"""The journal: repaired torn tails, loud corruption, and on object stores immutable segments in
tiers whose upload cost is linear in the journal (fsspec's memory:// filesystem stands in)."""

import json
import uuid

import pytest

from resilient.rundir import RunDir
from resilient.rundir.tiers import SegmentGap, Tiers, covering, read_segments, segment_name
from resilient.runlog.journal import (
    Journal,
    JournalCorrupt,
    JournalLost,
    journal_exists,
    read_records,
)

pytestmark = pytest.mark.timeout(30)


def test_a_torn_last_line_is_cut_back_and_the_next_append_is_whole(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    j = Journal(rd)
    j.append("job", name="n")
    j.append("progress", step=1)
    path = tmp_path / "run" / "journal.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"t": 3, "type": "progr')  # the driver died mid-append
    assert [r["type"] for r in read_records(rd)] == ["job", "progress"]  # readers skip the tail
    j = Journal(rd)  # a resumed run repairs it
    j.append("resume")
    assert [r["type"] for r in read_records(rd)] == ["job", "progress", "resume"]
    assert path.read_bytes().endswith(b'"type": "resume"}\n')


def test_a_damaged_line_in_the_middle_is_an_error_naming_it(tmp_path):
    rd = RunDir(str(tmp_path / "run"))
    j = Journal(rd)
    for i in range(3):
        j.append("progress", step=i)
    path = tmp_path / "run" / "journal.jsonl"
    lines = path.read_text().splitlines()
    lines[1] = "garbage{"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(JournalCorrupt, match="line 2"):
        read_records(rd)
    with pytest.raises(JournalCorrupt, match="line 2"):
        Journal(rd)


@pytest.mark.parametrize("how", ["removed", "moved", "replaced", "cut"])
def test_a_journal_taken_away_while_it_runs_is_an_error_not_a_new_journal(tmp_path, how):
    """The run directory deleted, moved, or its journal replaced or cut behind the launch's back:
    the next append says so and writes nothing (the old code began a journal with no `job`
    record, which `status` and `--resume` cannot use)."""
    import shutil

    run = tmp_path / "run"
    rd = RunDir(str(run))
    j = Journal(rd)
    j.append("job", name="n")
    j.append("progress", step=1)
    path = run / "journal.jsonl"
    if how == "removed":
        shutil.rmtree(run)
    elif how == "moved":
        run.rename(tmp_path / "elsewhere")
    elif how == "replaced":  # a copy put back: as long, another file
        (tmp_path / "copy").write_bytes(path.read_bytes())
        (tmp_path / "copy").replace(path)
    else:
        path.write_bytes(path.read_bytes().splitlines(keepends=True)[0])
    with pytest.raises(JournalLost, match=f"{path}.*(removed|replaced|cut).*--resume {run}"):
        j.append("progress", step=2)
    if how in ("removed", "moved"):
        assert not run.exists()  # nothing made in its place
    else:
        assert b'"step": 2' not in path.read_bytes()


def test_a_journal_reopened_appends_after_another_appender(tmp_path):
    """A resumed run's journal (opened on an existing file) and a second appender in the same
    file (a test's, a tool's) only make it longer: neither is a loss."""
    rd = RunDir(str(tmp_path / "run"))
    Journal(rd).append("job", name="n")
    j, other = Journal(rd), Journal(rd)
    j.append("resume")
    other.append("progress", step=1)
    j.append("progress", step=2)
    assert [r["type"] for r in read_records(rd)] == ["job", "resume", "progress", "progress"]


def test_covering_takes_each_item_once_and_reports_gaps():
    names = [segment_name(1, 0, 15, ".x")] + [segment_name(0, i, i, ".x") for i in range(20)]
    got = [(s.level, s.first, s.last) for s in covering(names)]
    assert got == [(1, 0, 15)] + [(0, i, i) for i in range(16, 20)]
    with pytest.raises(SegmentGap, match="17..18"):
        covering([segment_name(0, 0, 16, ".x"), segment_name(0, 19, 20, ".x")])


def test_tiers_merge_and_each_item_is_uploaded_a_bounded_number_of_times():
    rd = RunDir(f"memory://tiers-{uuid.uuid4().hex}")
    uploaded = []
    real = rd.write_bytes
    rd.write_bytes = lambda rel, data: (uploaded.append(len(data)), real(rel, data))
    t = Tiers(rd, "log", ".txt", b"".join, (4, 4))
    items = []
    for i in range(100):
        t.put(f"{i}\n".encode(), 1)
        items.append(f"{i}\n")
    stored = b"".join(d for _, d in read_segments(rd, "log"))
    assert stored.decode() == "".join(items)
    assert sum(uploaded) <= 3 * len(stored)
    assert len(rd.listdir("log")) <= 100 // 16 + 4 + 4  # top-level objects + a few below
    t.seal()
    assert len(rd.listdir("log")) <= 100 // 16 + 1


def test_a_tiers_writer_keeps_only_unmerged_level0_bytes_in_memory():
    """Memory bounded by one merge, not by the log: merged segments are read back when merged."""
    rd = RunDir(f"memory://tiers-{uuid.uuid4().hex}")
    t = Tiers(rd, "log", ".txt", b"".join, (4, 4))
    for i in range(100):
        t.put(f"{i}\n".encode(), 1)
        assert sum(1 for level in t.levels for _, data in level if data is not None) <= 4
        assert all(data is None for _, data in t.levels[1])
    stored = b"".join(d for _, d in read_segments(rd, "log"))
    assert stored.decode() == "".join(f"{i}\n" for i in range(100))


def test_remote_journal_is_segments_flushed_in_the_background():
    rd = RunDir(f"memory://journal-{uuid.uuid4().hex}")
    j = Journal(rd)
    for i in range(50):
        j.append("progress", step=i)
    assert j.flush(timeout=10) and j.durable
    assert journal_exists(rd) and not rd.exists("journal.jsonl")
    assert [r["step"] for r in read_records(rd)] == list(range(50))
    j2 = Journal(rd)  # a resumed supervisor appends after what is stored
    j2.append("resume")
    assert j2.flush(timeout=10)
    assert [r["type"] for r in read_records(rd)][-2:] == ["progress", "resume"]
    assert all(
        json.loads(line)
        for line in rd.read_bytes(f"journal/{rd.listdir('journal')[0]}").decode().splitlines()
    )


def test_a_failing_store_keeps_records_and_says_so():
    rd = RunDir(f"memory://down-{uuid.uuid4().hex}")
    j = Journal(rd)
    real = rd.write_bytes

    def down(rel, data):
        raise ConnectionError("storage is down")

    rd.write_bytes = down
    j.append("progress", step=1)
    assert not j.flush(timeout=2.5) and not j.durable and "storage is down" in j.error
    rd.write_bytes = real
    assert j.flush(timeout=10) and j.error is None
    assert [r["step"] for r in read_records(rd)] == [1]


def test_an_object_store_journal_deleted_while_it_runs_is_lost_not_begun_again():
    """The run directory's journal segments deleted behind the job's back (someone cleaned the
    bucket): the writer's next upload finds its newest segment gone, writes nothing, and the next
    append raises JournalLost as a local journal's does (the old code went on writing segments
    from item 2 on: a history without its `job` record, which `status` and `--resume` cannot
    read)."""
    rd = RunDir(f"memory://gone-{uuid.uuid4().hex}")
    j = Journal(rd)
    j.append("job", name="n")
    j.append("progress", step=1)
    assert j.flush(timeout=10)
    rd.remove("journal")
    j.append("progress", step=2)  # taken: the writer learns of the loss at its upload
    assert not j.flush(timeout=10) and not j.durable
    with pytest.raises(JournalLost, match=r"memory://gone-\w+/journal was deleted .*--resume"):
        j.append("progress", step=3)
    assert rd.listdir("journal") == []  # nothing began in its place


def test_a_guarded_tiers_writer_checks_the_segment_that_holds_the_last_item():
    """After merges the newest item lives in a merged segment (its sources are deleted by the
    writer itself): that is not a loss; deleting the merged one is."""
    from resilient.rundir.tiers import SegmentsLost

    rd = RunDir(f"memory://guard-{uuid.uuid4().hex}")
    t = Tiers(rd, "log", ".txt", b"".join, (4, 4), guard=True)
    for i in range(40):  # level-1 and level-2 merges on the way
        t.put(f"{i}\n".encode(), 1)
    assert t.newest and rd.exists(f"log/{t.newest.name}")
    rd.remove(f"log/{t.newest.name}")
    with pytest.raises(SegmentsLost, match="is gone"):
        t.put(b"40\n", 1)
    assert not any(s.startswith("L0-000000000040") for s in rd.listdir("log"))


def test_a_deletion_that_spares_the_newest_segment_is_still_found():
    """`rm -r` lists, then deletes: a segment uploaded in between survives and holds the newest
    item, while item 0 is gone. The writer checks the first segment too (the first version of the
    guard went on writing after the gap), and a merge that misses a source says so."""
    from resilient.rundir.tiers import SegmentsLost

    rd = RunDir(f"memory://spared-{uuid.uuid4().hex}")
    t = Tiers(rd, "log", ".txt", b"".join, (4, 4), guard=True)
    for i in range(6):
        t.put(f"{i}\n".encode(), 1)
    for name in rd.listdir("log"):
        if name != t.newest.name:
            rd.remove(f"log/{name}")
    with pytest.raises(SegmentsLost, match="first segment"):
        t.put(b"6\n", 1)
    rd = RunDir(f"memory://merge-{uuid.uuid4().hex}")
    merging = Tiers(rd, "log", ".txt", b"".join, (2, 2), guard=True)
    for i in range(2):
        merging.put(f"{i}\n".encode(), 1)  # one level-1 segment, read back at the next merge
    merging.put(b"2\n", 1)  # the newest now: the level-1 segment is neither checked...
    merging.oldest = None  # (... nor the first: the merge's own check, alone)
    rd.remove(f"log/{merging.levels[1][0][0].name}")
    with pytest.raises(SegmentsLost, match="to merge is gone"):
        merging.put(b"3\n", 1)


def test_an_outage_is_never_taken_for_a_deletion(monkeypatch):
    """fsspec's generic `exists` says False on any error: the guard asks `RunDir.gone`, which says
    True only for a missing object and raises otherwise (the writer retries an outage)."""
    rd = RunDir(f"memory://outage-{uuid.uuid4().hex}")
    t = Tiers(rd, "log", ".txt", b"".join, (4, 4), guard=True)
    t.put(b"0\n", 1)
    assert rd.gone("log/nothing-here") and not rd.gone(f"log/{t.newest.name}")

    def down(path, **kw):
        raise ConnectionError("storage is down")

    monkeypatch.setattr(rd.fs, "info", down)
    with pytest.raises(ConnectionError):
        t.put(b"1\n", 1)
    monkeypatch.undo()
    t.put(b"1\n", 1)  # storage back: the writer goes on
    assert [s.last for s, _ in read_segments(rd, "log")] == [0, 1]


@pytest.mark.timeout(30)
def test_a_local_copy_of_an_object_store_run_reads_as_the_run(tmp_path):
    """`aws s3 sync s3://bucket/run ./run`: status, logs and the dashboard read its segments."""
    from resilient.runlog.ranklogs import LogReader

    (tmp_path / "journal").mkdir()
    (tmp_path / "logs" / "rank-1").mkdir(parents=True)
    recs = [{"t": 1.0, "type": "job"}, {"t": 2.0, "type": "progress", "step": 1}]
    body = "".join(json.dumps(r) + "\n" for r in recs)
    (tmp_path / "journal" / segment_name(0, 0, 1, ".jsonl")).write_text(body)
    (tmp_path / "logs" / "rank-1" / segment_name(0, 0, 0, ".log")).write_text("a\nb\n")
    rd = RunDir(str(tmp_path))
    assert journal_exists(rd) and read_records(rd) == recs
    assert LogReader(rd, 1).new_lines() == ["a", "b"]
    (tmp_path / "journal.jsonl").write_text(json.dumps(recs[0]) + "\n")  # a local run's own
    assert read_records(rd) == recs[:1]
