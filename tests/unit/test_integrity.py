"""Replica digests and compute audits (training.integrity and the trainer's checked step): the
audit's recomputation reproduces a rank's own gradient bit for bit, a checked step trains the same
update as a plain one, a bad_compute rank's work does not reproduce, and `judge` / `culprit_of`
name the odd rank."""

import pytest
import torch

from resilient.training.integrity import Check, culprit_of, digest, judge, known_answer
from tests.unit import test_trainer_resume as tr

_trainer = tr._trainer
world, work = tr.world, tr.work  # the same module-scoped fixtures: one process group, one model

pytestmark = pytest.mark.timeout(120)


def _params(t):
    return [p.detach().clone() for p in t.params]


@pytest.mark.parametrize(
    "model,train",
    [({}, {}), ({"dtype": "bfloat16"}, {"grad_accum_steps": 2, "gradient_checkpointing": True})],
)
def test_a_checked_step_trains_the_same_update_and_its_audit_reproduces(world, work, model, train):
    plain, checked = _trainer(work, model, train), _trainer(work, model, train)
    for s in range(1, 4):
        plain.step(s)
        r = checked.step(s, check=True, audit=True)
        ((state, own, audited),) = r.digests  # one rank: it audits itself
        assert own == audited != 0, "the audit's recomputation differs from the rank's own gradient"
        assert state == checked.state_digest()
    assert all(torch.equal(a, b) for a, b in zip(_params(plain), _params(checked), strict=True))


def test_bad_compute_does_not_reproduce_and_fails_the_known_answer(world, work):
    good, bad = _trainer(work, {}, {}), _trainer(work, {}, {})
    bad.corrupt = True
    (g,) = good.step(1, check=True, audit=True).digests
    (b,) = bad.step(1, check=True, audit=True).digests
    assert g[1] != b[1], "a perturbed gradient digests the same"
    assert known_answer(torch.device("cpu")) and not known_answer(torch.device("cpu"), True)


def test_judge_names_the_odd_replica_and_the_failed_audits():
    assert judge([(5, 1, 2), (5, 2, 1)], 10, True) == Check(10, True, (), (), (5, 5))
    three = judge([(5, 0, 0), (6, 0, 0), (5, 0, 0)], 10, False)
    assert not three.agreed and three.odd == (1,)
    assert judge([(5, 0, 0), (6, 0, 0)], 10, False).odd == ()  # two: nobody is outvoted
    # rank 1 computes wrong: its own digest (11) and its audit of rank 2 (99) are off
    rows = [(7, 10, 12), (7, 11, 99), (7, 20, 10)]
    c = judge(rows, 10, True)
    assert c.agreed and not c.ok and set(c.failed_audits) == {(0, 1), (1, 2)}
    assert culprit_of(c.failed_audits, 3) == 1
    assert culprit_of(((0, 1), (1, 0)), 2) is None  # two ranks: the known-answer test decides
    # replicas apart (a flipped bit): an audit on different weights says nothing of the compute
    apart = judge([(7, 10, 12), (8, 11, 99), (7, 20, 10)], 10, True)
    assert apart.odd == (1,) and apart.failed_audits == ()


def test_digest_sees_one_flipped_bit():
    t = torch.randn(64)
    flipped = t.clone()
    flipped.view(torch.int32)[3] ^= 1 << 4
    assert digest([t]) != digest([flipped]) and digest([t]) == digest([t.clone()])


def _three_ranks(rank: int, port: int, work, out) -> None:
    """One of three gloo ranks: a plain and a checked trainer side by side, 3 steps each."""
    import torch.distributed as dist

    from resilient.config import validate_tree
    from resilient.training.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    spec = validate_tree(
        {
            "name": "t",
            "model": {"builtin": "tiny-llama"},
            "cluster": {"num_workers": 3},
            "data": {"path": str(work / "c.txt"), "seq_len": 32},
            "train": {"steps": 4, "batch_size": 2, "seed": 3},
            "checkpoint": {"storage": str(work / "runs")},
        }
    )
    plain, checked = (Trainer(spec, rank, 3, str(work / "base"), torch.device("cpu")) for _ in "ab")
    plain.setup()
    checked.setup()
    rows = ()
    for s in range(1, 4):
        plain.step(s)
        rows = checked.step(s, check=True, audit=True).digests
    same = all(torch.equal(a, b) for a, b in zip(plain.params, checked.params, strict=True))
    out.put((rank, same, rows))
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_three_ranks_checked_step_is_ddps_update_and_every_audit_passes(work):
    """Three processes (the flat all-reduce's order and the audit ring at 3+ ranks)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_three_ranks, args=(r, port, work, out)) for r in range(3)]
    for p in procs:
        p.start()
    try:
        got = sorted(out.get(timeout=240) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(same for _, same, _ in got), "a checked step trained a different update"
    check = judge(got[0][2], 3, True)
    assert check.ok, check
