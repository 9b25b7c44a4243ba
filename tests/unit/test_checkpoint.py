import pytest
import torch

from resilient.checkpoint.snapshot import Snapshot, optimizer_parts, optimizer_state
from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore, ckpt_dir
from resilient.rundir import RunDir

pytestmark = pytest.mark.timeout(30)


def snap(step: int) -> Snapshot:
    g = torch.Generator().manual_seed(step)
    return Snapshot(step=step, data_step=step + 1,
                    shared={"model.a": torch.randn(3, 4, generator=g), "optim.0.step": torch.tensor(float(step))},
                    per_rank={0: {"rng.torch": torch.get_rng_state()}, 1: {"rng.torch": torch.get_rng_state() + 1}},
                    meta={"optimizer": {"param_groups": [{"lr": 0.1, "params": [0]}], "scalars": {}}})


def test_snapshot_round_trip_every_part():
    s = snap(3)
    back = Snapshot.from_files(s.to_files())
    assert (back.step, back.data_step) == (3, 4)
    for k in s.shared:
        assert torch.equal(s.shared[k], back.shared[k])
    for r in s.per_rank:
        assert torch.equal(s.per_rank[r]["rng.torch"], back.per_rank[r]["rng.torch"])
    assert back.meta["optimizer"] == s.meta["optimizer"]


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


@pytest.fixture
def store(tmp_path):
    return CheckpointStore(RunDir(f"file://{tmp_path}/run"))


def test_commit_makes_visible_only_with_manifest(store):
    files = snap(5).to_files()
    for name, data in files.items():  # a writer that died before its manifest
        store.rundir.write_bytes(f"{ckpt_dir(5)}/{name}", data)
    assert store.steps() == []
    store.commit(5, files, "fp")
    assert store.steps() == [5]
    store.verify(5, "fp")
    assert Snapshot.from_files(store.load(5)).step == 5


def test_checksum_mismatch_falls_back_to_older(store):
    for s in (5, 10):
        store.commit(s, snap(s).to_files(), "fp")
    path = store.rundir.local_path(f"{ckpt_dir(10)}/shared.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-10] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointInvalid, match="checksum"):
        store.verify(10)
    step, skipped = store.newest_valid("fp")
    assert step == 5 and "checksum" in skipped[0]


def test_fingerprint_mismatch_is_refused(store):
    store.commit(5, snap(5).to_files(), "fp")
    with pytest.raises(CheckpointInvalid, match="different spec"):
        store.load(5, "other")


def test_retention_never_deletes_the_newest(store):
    for s in (5, 10, 15, 20):
        store.commit(s, snap(s).to_files(), "fp")
    assert store.retain(2) == [5, 10]
    assert store.steps() == [15, 20]
    assert store.retain(0) == [15]  # keep=0 still keeps the newest
    assert store.steps() == [20]
