"""Exact resume inside one rank, for each GPU-ready combination: training N steps straight gives
the same adapter, bit for bit, as training k steps, taking a snapshot, restoring it into a fresh
trainer and training the rest (float16's gradient scaler and the scheduler's state included).
A one-rank gloo group, no Ray."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from resilient.checkpoint.snapshot import Snapshot
from resilient.config import validate_tree
from resilient.training.corpus import write_corpus
from resilient.training.data import BYTE_VOCAB
from resilient.training.model import build_tiny_llama, trainable_state
from resilient.training.trainer import Trainer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def world():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    write_corpus(str(d / "c.txt"), 300)
    build_tiny_llama(str(d / "base"), BYTE_VOCAB)
    return d


def _trainer(work, model: dict, train: dict) -> Trainer:
    spec = validate_tree(
        {
            "name": "t",
            "model": {"builtin": "tiny-llama", **model},
            "data": {"path": str(work / "c.txt"), "seq_len": 32},
            "train": {"steps": 8, "batch_size": 2, "seed": 3, **train},
            "checkpoint": {"storage": str(work / "runs")},
        }
    )
    t = Trainer(spec, 0, 1, str(work / "base"), torch.device("cpu"))
    t.setup()
    return t


@pytest.mark.parametrize(
    "model,train",
    [
        ({"dtype": "float16"}, {"lr_scheduler": "linear", "warmup_steps": 2}),
        (
            {"dtype": "bfloat16"},
            {"grad_accum_steps": 2, "gradient_checkpointing": True, "lr_scheduler": "cosine"},
        ),
        ({}, {"lr_scheduler": "polynomial", "warmup_steps": 3, "grad_accum_steps": 3}),
    ],
)
def test_snapshot_restore_is_exact(world, work, model, train):
    straight = _trainer(work, model, train)
    for s in range(1, 9):
        straight.step(s)
    first = _trainer(work, model, train)
    for s in range(1, 5):
        first.step(s)
    snap = Snapshot.from_files(first.snapshot(4, 4, "fp").to_files())  # as storage holds it
    resumed = _trainer(work, model, train)
    resumed.restore(snap)
    for s in range(5, 9):
        resumed.step(s)
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    if model.get("dtype") == "float16":
        assert resumed.scaler.get_scale() == straight.scaler.get_scale()
