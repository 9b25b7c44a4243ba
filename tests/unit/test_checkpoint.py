import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from resilient.checkpoint.snapshot import (
    Snapshot,
    host_copy,
    optimizer_parts,
    optimizer_state,
    tensor_bytes,
)
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore, ckpt_dir, make_manifest
from resilient.rundir import RunDir

pytestmark = pytest.mark.timeout(30)


def snap(step: int) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    return Snapshot(
        step=step,
        data_step=step + 1,
        shared={
            "model.a": torch.randn(3, 4, generator=g),
            "optim.0.step": torch.tensor(float(step)),
        },
        meta={"optimizer": {"param_groups": [{"lr": 0.1, "params": [0]}], "scalars": {}}},
    )


def test_snapshot_round_trip_every_part():
    s = snap(3)
    back = Snapshot.from_files(s.to_files())
    assert (back.step, back.data_step) == (3, 4)
    for k in s.shared:
        assert torch.equal(s.shared[k], back.shared[k])
    assert back.meta["optimizer"] == s.meta["optimizer"]


def test_a_host_copy_is_its_own_contiguous_tensor_that_serialises():
    """What training does to the state after the snapshot never reaches it, and every copy is
    contiguous (safetensors refuses strided tensors), also from a transposed source."""
    param = torch.nn.Parameter(torch.randn(3, 4))
    strided = torch.randn(4, 3).t()
    copy = host_copy({"model.p": param.detach(), "optim.0.exp_avg": strided})
    with torch.no_grad():
        param.add_(1.0)
        strided.mul_(2.0)
    assert not torch.equal(copy["model.p"], param.detach())
    assert torch.equal(copy["optim.0.exp_avg"] * 2.0, strided)
    assert all(t.is_contiguous() and not t.requires_grad for t in copy.values())
    back = Snapshot(step=1, data_step=1, shared=copy).to_files()
    assert torch.equal(Snapshot.from_files(back).shared["model.p"], copy["model.p"])


def test_a_snapshot_file_is_the_one_safetensors_writes_for_every_dtype():
    """The numpy front end (numpy's dtypes) writes the very bytes safetensors' torch front end
    does; a bfloat16 tensor goes through the torch front end; both read back equal."""
    plain = {
        "model.w": torch.randn(4, 3),
        "optim.0.step": torch.tensor(7.0),
        "optim.0.exp_avg": torch.randn(5, dtype=torch.float64),
        "half": torch.randn(2, 2).half(),
        "ints": torch.arange(6, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    assert tensor_bytes(plain) == st_save(plain)
    mixed = {**plain, "model.b": torch.randn(3).bfloat16()}
    back = st_load(tensor_bytes(mixed))
    assert set(back) == set(mixed)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in mixed.items())


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.01)
    p.grad = torch.randn(5)
    opt.step()
    tensors, meta = optimizer_parts(opt.state_dict())
    import json

    meta = json.loads(json.dumps(meta))  # what storage does to it
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.01)
    opt2.load_state_dict(optimizer_state(tensors, meta))
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def commit(store, step):
    files = snap(step).to_files()
    store.commit(files, make_manifest(step, files, "fp"))


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(RunDir(f"file://{tmp_path}/run"))


def test_commit_makes_visible_only_with_manifest(store):
    files = snap(5).to_files()
    for name, data in files.items():  # a writer that died before its manifest
        store.rundir.write_bytes(f"{ckpt_dir(5)}/{name}", data)
    assert store.steps() == []
    store.commit(files, make_manifest(5, files, "fp"))
    assert store.steps() == [5]
    store.verify(5, "fp")
    assert Snapshot.from_files(store.load(5)).step == 5


def test_checksum_mismatch_falls_back_to_older(store):
    for s in (5, 10):
        commit(store, s)
    path = store.rundir.local_path(f"{ckpt_dir(10)}/shared.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointInvalid, match="checksum"):
        store.verify(10)
    from resilient.supervisor.nodes import Nodes

    found = Nodes(None, "").restore_source(store, "fp")  # no node agents: storage only
    assert found.source.step == 5 and found.source.tier == "storage"
    assert "checksum" in found.skipped[0] and found.storage_error is None


def test_a_rollback_abandons_the_later_timeline_in_storage_and_in_the_journal(store):
    """States persisted after a rollback's restore point (trained on a corrupted state, or on
    data the rollback skips) are journalled as abandoned, then deleted, or, while storage cannot
    delete them, never restored; a resumed supervisor knows it from the journal."""
    import time

    from resilient.supervisor.intake import Intake
    from resilient.supervisor.nodes import Nodes
    from resilient.supervisor.restore import abandon_after

    class Journal:
        def __init__(self):
            self.records = []

        def append(self, kind, **fields):
            self.records.append({"t": time.time(), "type": kind, **fields})
            return self.records[-1]

        def extend(self, items):
            return [self.append(kind, **fields) for kind, fields in items]

    for s in (100, 110, 120, 130):
        commit(store, s)  # 130: committed, its `persisted` event not yet in the journal
    nodes, journal = Nodes(None, ""), Journal()
    intake = Intake(journal, None, nodes)
    intake.learn([{"type": "persisted", "step": s, "persisted_at": 1.0} for s in (100, 110, 120)])

    class Down:  # storage that lists but cannot delete
        def steps(self):
            return store.steps()

        def discard(self, step):
            raise OSError("503 Slow Down")

    abandon_after(100, nodes, intake, Down(), journal, {"from_step": 125, "reason": "sdc"})
    (rollback,) = journal.records
    assert rollback["abandoned"] == [110, 120, 130] and rollback["reason"] == "sdc"
    assert intake.newest_persisted() == 100 and intake.abandoned == {110, 120, 130}
    found = nodes.restore_source(store, "fp", None, frozenset(intake.abandoned))
    assert found.source.step == 100
    late = {"type": "persisted", "step": 130, "persisted_at": 2.0}  # the old timeline's, late
    intake.learn([late])
    assert 130 in intake.abandoned and intake.newest_persisted() == 100
    abandon_after(100, nodes, intake, store, journal, {"from_step": 101, "reason": "nan"})
    assert journal.records[-1]["type"] == "discarded" and journal.records[-1]["steps"] == [
        110,
        120,
        130,
    ]
    assert store.steps() == [100] and not intake.abandoned
    resumed = Intake(None, None, nodes)  # a new supervisor reads the same journal
    again = {"type": "persisted", "step": 110, "persisted_at": time.time() + 1}  # the new timeline
    resumed.learn([late, *journal.records[:1], again])
    assert resumed.newest_persisted() == 110 and resumed.abandoned == {120, 130}


def test_fingerprint_mismatch_is_refused(store):
    commit(store, 5)
    with pytest.raises(CheckpointInvalid, match="different spec"):
        store.load(5, "other")


def test_retention_never_deletes_the_newest(store):
    for s in (5, 10, 15, 20):
        commit(store, s)
    assert store.retain(2) == [5, 10]
    assert store.steps() == [15, 20]
    assert store.retain(0) == [15]  # keep=0 still keeps the newest
    assert store.steps() == [20]


def test_retention_keep_every():
    from resilient.checkpoint.retention import doomed

    assert doomed([10, 20, 30, 40, 50], keep=2, keep_every=20) == [10, 30]
    assert doomed([], keep=3) == []


def test_memory_tier_bounds_pending_and_never_drops_the_newest():
    from resilient.checkpoint.memory import Entry, MemoryTier

    tier = MemoryTier(keep=2, max_pending=2)
    events = []
    for step in range(1, 6):
        events += tier.put(Entry(step, {"a": b"x"}, {"step": step}, role="memory", persist=True))
    assert [e["step"] for e in events] == [1, 2, 3]  # oldest waiting ones dropped
    assert tier.next_pending().step == 4
    tier.mark_persisted(4)
    assert tier.next_pending().step == 5
    assert [e["step"] for e in tier.inventory()] == [5, 4]  # newest `keep` stay in memory


def test_the_snapshot_being_written_is_never_dropped_nor_its_upload_undone(tmp_path):
    """Training that outruns storage (a put every 5 ms, a commit every 30 ms, 2 may wait): the
    persister's uploads land and stay, and newer steps keep reaching storage. The old code
    dropped the oldest waiting snapshot, the very one being written, and the persister then took
    its finished upload for one a rollback abandoned and deleted it: nothing newer than the step
    before the queue filled was ever persisted (acceptance 8 restored step 64 of 167)."""
    import time

    from resilient.checkpoint.memory import Entry, MemoryTier
    from resilient.checkpoint.persister import Persister

    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    commit = store.commit

    def slow_commit(*a, **kw):
        time.sleep(0.03)
        return commit(*a, **kw)

    store.commit = slow_commit
    tier = MemoryTier(keep=2, max_pending=2)
    p = Persister(tier, store, keep=1000, keep_every=0)
    events = []
    for step in range(1, 61):
        files = {"a.bin": bytes([step]) * 8}
        entry = Entry(step, files, make_manifest(step, files, "fp"), role="memory", persist=True)
        events += tier.put(entry)
        time.sleep(0.005)
    assert p.wait_persisted(60, 10)  # the newest is never dropped
    deadline = time.monotonic() + 10  # its event comes just after
    while not any(e["event"] == "persisted" and e["step"] == 60 for e in events):
        assert time.monotonic() < deadline, events
        events += p.drain_events()
        time.sleep(0.01)
    persisted = [e["step"] for e in events if e["event"] == "persisted"]
    assert not [e for e in events if e["event"] == "abandoned"], events
    assert len(persisted) >= 3 and persisted == sorted(persisted), persisted
    assert store.steps() == persisted  # every upload stays
    dropped = [e["step"] for e in events if e["event"] == "persist_dropped"]
    assert dropped and not set(dropped) & set(persisted)
    assert len(tier.entries) <= 2 + 1 + 2  # bounded: the newest, the waiting, the one written


def test_a_snapshot_storage_always_refuses_does_not_hold_the_queue(tmp_path):
    """A failed upload gives its claim back: newer snapshots push it out as before, and the
    newest still reaches storage."""
    import threading

    from resilient.checkpoint.memory import Entry, MemoryTier
    from resilient.checkpoint.persister import Persister

    store = CheckpointStore(RunDir(str(tmp_path / "run")))
    commit = store.commit
    tier = MemoryTier(keep=2, max_pending=2)
    p = Persister(tier, store, keep=1000, keep_every=0, max_backoff=0.2)
    refused = threading.Event()

    def refuse_3(files, manifest, *a, **kw):
        if manifest["step"] == 3:
            refused.set()
            raise OSError("refused")
        return commit(files, manifest, *a, **kw)

    store.commit = refuse_3
    for step in range(1, 15):
        files = {"a.bin": bytes([step]) * 8}
        tier.put(Entry(step, files, make_manifest(step, files, "fp"), role="memory", persist=True))
        if step < 3:
            assert p.wait_persisted(step, 10)
        elif step == 3:  # its upload failed once before newer ones come
            assert refused.wait(10)
    assert p.wait_persisted(14, 10)
    assert 3 not in store.steps() and store.steps()[-1] == 14


def test_memory_tier_keeps_unpersisted_beyond_keep():
    from resilient.checkpoint.memory import Entry, MemoryTier

    tier = MemoryTier(keep=1, max_pending=10)
    tier.put(Entry(1, {}, {}, role="memory", persist=True))
    tier.put(Entry(2, {}, {}, role="memory", persist=False))
    assert tier.get(1) is not None  # still waiting for storage
    tier.mark_persisted(1)
    assert tier.get(1) is None and tier.get(2) is not None


def test_exporting_a_step_that_was_not_persisted_says_which_were(tmp_path):
    """`ckpt export --step N` of a step with no checkpoint: the same message as `ckpt verify`'s,
    naming the persisted ones (the old code printed a missing manifest's file error)."""
    from resilient.runlog.journal import Journal
    from tests.helpers import resilient_cli

    rd = RunDir(str(tmp_path / "run"))
    Journal(rd).append("job", name="n", run_id="r", total_steps=9, run_dir=rd.uri)
    assert CheckpointStore(rd).steps() == []
    r = resilient_cli("ckpt", "export", str(tmp_path / "run"), "--step", "5", str(tmp_path / "o"))
    assert r.returncode == 2, r.stdout
    assert (
        "--step 5: " in r.stdout
        and "has no persisted checkpoint of that step (it has none)" in r.stdout
    )
    assert "manifest" not in r.stdout and not (tmp_path / "o").exists()


def test_snapshots_dropped_for_slow_storage_are_said_once_in_a_while(caplog):
    """Each drop is journalled; the user is told at the first and then once a DROP_WARN_S with
    the count (the old code journalled them and said nothing: the persisted step lagged
    silently)."""
    from resilient.supervisor import intake as intake_mod
    from resilient.supervisor.intake import Intake

    class Journal:
        def __init__(self):
            self.records = []

        def append(self, kind, **fields):
            self.records.append({"type": kind, **fields})

        def extend(self, items):

            for kind, fields in items:
                self.append(kind, **fields)

    class Nodes:
        def __init__(self, events):
            self.events = events

        def flush_events(self):
            out, self.events = self.events, []
            return out

    def drop(step):
        reason = "16 snapshots already waiting for storage"
        return {"event": "persist_dropped", "step": step, "reason": reason}

    nodes = Nodes([drop(s) for s in (66, 68, 70)])
    journal = Journal()
    intake = Intake(journal, None, nodes)
    with caplog.at_level("WARNING", logger="resilient.supervisor.intake"):
        intake._journal_agent_events(nodes.flush_events())
        assert len(caplog.records) == 1 and "step 66" in caplog.text
        assert "checkpoint.persist_every" in caplog.text
        intake._drop_warned -= intake_mod.DROP_WARN_S  # ten minutes later
        intake._journal_agent_events([drop(90)])
        intake._journal_agent_events([drop(92)])  # within ten minutes: counted only
        intake.monitor = type("M", (), {"close": lambda self: None})()
        intake.close()  # the job ends: what is left is said
    msgs = [r.getMessage() for r in caplog.records]
    assert (
        len(msgs) == 3
        and "3 snapshot(s) dropped before reaching it (the last: step 90" in (msgs[1])
    )
    assert "1 snapshot(s) dropped before reaching it (the last: step 92" in msgs[2], msgs
    assert [r["step"] for r in journal.records] == [66, 68, 70, 90, 92]
