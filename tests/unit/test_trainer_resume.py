"""Exact resume inside one rank, for each GPU-ready combination: training N steps straight gives
the same adapter, bit for bit, as training k steps, taking a snapshot, restoring it into a fresh
trainer and training the rest (float16's gradient scaler and the scheduler's state included).
A one-rank gloo group, no Ray."""

import json
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from resilient.checkpoint.snapshot import Snapshot
from resilient.config import validate_tree
from resilient.training.corpus import write_corpus
from resilient.training.data import BYTE_VOCAB
from resilient.training.model import build_tiny_llama, trainable_state, unused_parameters
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


def _trainer(
    work, model: dict, train: dict, peft: dict | None = None, data: dict | None = None, **extra
) -> Trainer:
    spec = validate_tree(
        {
            "name": "t",
            "model": {"builtin": "tiny-llama", **model},
            **({"peft": peft} if peft else {}),
            **extra,
            "data": {"path": str(work / "c.txt"), "seq_len": 32, **(data or {})},
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


def test_a_step_seeds_only_the_generator_its_rank_draws_from(world, work, monkeypatch):
    """Dropout's draws are a function of (seed, step, microbatch) alone, drawn from the rank's own
    device's generator: a CPU rank's step seeds no accelerator type (torch.manual_seed queues each
    one, with a traceback, at 0.1-0.3 ms a microbatch), and draws what torch.manual_seed with that
    seed gives, so adapters trained before this match bit for bit."""
    peft = {"method": "lora", "r": 2, "lora_dropout": 0.3, "target_modules": ["q_proj", "v_proj"]}

    def seeded(seed):
        raise AssertionError("a CPU rank's step seeded an accelerator")

    def trained(seeding=None) -> dict:
        t = _trainer(work, {}, {"seed": 5}, peft)
        with monkeypatch.context() as m:
            if seeding:
                m.setattr(Trainer, "_seed", lambda self, step, i: seeding(step, i) and None)
            else:
                for accelerator in (torch.cuda, torch.xpu, torch.mtia):
                    m.setattr(accelerator, "manual_seed_all", seeded)
            for s in range(1, 4):
                t.step(s)
        return trainable_state(t.model)

    before = trained(lambda step, i: torch.manual_seed((5 * 1_000_003 + step) * 65_537 + i))
    other = trained(lambda step, i: torch.manual_seed(step * 7 + i))  # dropout's draws count
    now = trained()
    assert now.keys() == before.keys() and now
    assert all(torch.equal(now[k], before[k]) for k in before)
    assert not all(torch.equal(now[k], other[k]) for k in other)


CHAT = {
    "format": "chat",
    "packing": True,
    "seq_len": 96,
    "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}",
}


def test_packed_chat_with_evaluations_resumes_exactly(world, work):
    """Loss masks, packing and evaluations (which must not perturb training) between steps: the
    same adapter, bit for bit, straight or resumed; the early-stopping state travels too."""
    chat = work / "chat.jsonl"
    with open(chat, "w") as f:
        for i in range(120):
            msgs = [
                {"role": "user", "content": f"what is {i} plus 2?"},
                {"role": "assistant", "content": f"{i} plus 2 is {i + 2}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    data = {**CHAT, "path": str(chat)}
    ev = {"eval": {"split": 0.1, "every": 2}}

    def run(steps, start=None, evaluate=True):
        t = _trainer(work, {}, {}, None, data, **ev)
        if start:
            t.restore(start)
        first = start.step + 1 if start else 1
        for s in range(first, first + steps):
            t.step(s)
            if evaluate and s % 2 == 0:
                t.evaluate(s)
        return t

    straight, quiet = run(8), run(8, evaluate=False)
    snap = Snapshot.from_files(run(4).snapshot(4, 4, "fp").to_files())
    resumed = run(4, snap)
    a, b, c = (trainable_state(t.model) for t in (straight, resumed, quiet))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert straight.evals.best == resumed.evals.best and straight.evals.best_step
    m = straight.evaluate(9)
    assert 0 < m["accuracy"] < 1 and m["tokens"] > 0 and m["perplexity"] > 1


QV = {"target_modules": ["q_proj", "v_proj"]}
METHODS = {
    "prefix_tuning": {"method": "prefix_tuning", "num_virtual_tokens": 4},
    "prompt_tuning": {"method": "prompt_tuning", "num_virtual_tokens": 4},
    "p_tuning": {"method": "p_tuning", "num_virtual_tokens": 4, "encoder_hidden_size": 16},
    "ia3": {
        "method": "ia3",
        "target_modules": ["k_proj", "down_proj"],
        "feedforward_modules": ["down_proj"],
    },
    "loha": {"method": "loha", "r": 2, **QV},
    "lokr": {"method": "lokr", "r": 2, **QV},
    "dora": {"method": "lora", "r": 2, "use_dora": True, **QV},
    "loraplus": {"method": "lora", "r": 2, **QV},
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_peft_method_resumes_exactly(world, work, name):
    """Each method trains (every adapter tensor moves) and a snapshot restores it bit for bit,
    LoRA+'s parameter groups included."""
    train = {"loraplus_lr_ratio": 16} if name == "loraplus" else {}
    peft = METHODS[name]

    def run(steps, start=None):
        t = _trainer(work, {}, train, peft)
        if start:
            t.restore(start)
        first = start.step + 1 if start else 1
        for s in range(first, first + steps):
            t.step(s)
        return t

    init = trainable_state(_trainer(work, {}, train, peft).model)
    straight = run(8)
    assert not straight.unused
    first = run(4)
    snap = Snapshot.from_files(first.snapshot(4, 4, "fp").to_files())
    resumed = run(4, snap)
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), name
    assert not [k for k in a if torch.equal(a[k], init[k])], f"{name}: tensors that did not train"
    if name == "loraplus":
        rates = sorted({g["lr"] for g in straight.optimizer.param_groups if g["params"]})
        assert rates == [pytest.approx(1e-3), pytest.approx(16e-3)]


def test_unused_parameters_are_found_and_leave_no_trace():
    """What DDP must be told (find_unused_parameters); the probe draws no random number and
    leaves no gradient behind."""

    class Half(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)

        def forward(self, input_ids, labels):
            x = torch.nn.functional.dropout(input_ids.float(), 0.5)
            return SimpleNamespace(loss=self.used(x).sum())

    model, rng = Half(), torch.get_rng_state()
    assert unused_parameters(model, torch.arange(4)) == ["spare.weight", "spare.bias"]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
