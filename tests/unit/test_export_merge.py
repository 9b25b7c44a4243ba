"""`ckpt export --best` and `--merge` on a run directory built by hand (spec.json, a staged base
model, committed checkpoints whose manifests may carry an eval loss; no Ray, no Trainer): --best
picks the lowest eval loss, --merge writes a model `AutoModelForCausalLM.from_pretrained` loads
alone (with the base's tokenizer where it has one) that computes what the base with the adapter
does, and every refusal is one line with exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from resilient.checkpoint.snapshot import Snapshot
from resilient.checkpoint.storage import CheckpointStore, make_manifest
from resilient.cli import cli
from resilient.config import validate_tree
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, JOURNAL, SPEC_FILE
from resilient.training.data import BYTE_VOCAB
from resilient.training.export import best_step, export_merged, export_step
from resilient.training.model import apply_adapter, build_tiny_llama, load_base, trainable_state

LOSSES = {10: 2.0, 20: 0.5, 30: 0.5, 40: None}  # 20 and 30 tie (the earlier wins); 40: no eval


def make_run(tmp_path, losses: dict[int, float | None], chat: bool = False) -> RunDir:
    """A run directory as a launch leaves it, with a checkpoint per step of `losses` whose
    adapter is the initial one moved by noise seeded by the step (so that merging changes
    the weights)."""
    base = tmp_path / "base"
    if chat:
        from resilient.training.tiny_chat import build_tiny_chat_model

        build_tiny_chat_model(str(base))
    else:
        build_tiny_llama(str(base), BYTE_VOCAB)
    rd = RunDir(str(tmp_path / "run"))
    staged.publish(rd, str(base), BASE_MODEL)
    spec = validate_tree(
        {
            "name": "m",
            "model": {"builtin": "tiny-llama-chat" if chat else "tiny-llama"},
            "data": {"path": str(tmp_path / "c.txt"), "seq_len": 16},
            "checkpoint": {"storage": str(tmp_path)},
        }
    )
    rd.write_json(SPEC_FILE, spec.model_dump(mode="json"))
    rd.write_bytes(JOURNAL, b"")  # what makes it a run directory to the CLI
    model = apply_adapter(load_base(str(base)), spec.peft, spec.train.seed)
    store = CheckpointStore(rd)
    for step, loss in losses.items():
        g = torch.Generator().manual_seed(step)
        shared = {
            f"model.{k}": v + 0.05 * torch.randn(v.shape, generator=g)
            for k, v in trainable_state(model).items()
        }
        files = Snapshot(step, step, shared).to_files()
        ev = {"eval": {"loss": loss, "perplexity": 2.0, "accuracy": 0.5}} if loss else {}
        store.commit(files, make_manifest(step, files, spec.fingerprint(), **ev))
    return rd


def export(*args: str):
    r = CliRunner().invoke(cli, ["ckpt", "export", *args], env={"COLUMNS": "200"})
    return r.exit_code, r.output


@pytest.mark.timeout(120)
def test_best_picks_the_lowest_eval_loss_and_the_earlier_of_a_tie(tmp_path):
    from safetensors.torch import load_file

    rd = make_run(tmp_path, LOSSES)
    assert best_step(rd) == (20, 0.5)
    code, out = export(rd.uri, "--best", str(tmp_path / "best"))
    assert code == 0, out
    assert "step 20" in out and "eval loss 0.5000" in out
    export_step(rd, 20, str(tmp_path / "ref"))
    got = load_file(str(tmp_path / "best" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    r = CliRunner().invoke(cli, ["ckpt", "list", rd.uri], env={"COLUMNS": "200"})
    rows = {
        ln.split()[1]: ln for ln in r.output.splitlines() if ln.split()[1:2] in (["10"], ["40"])
    }
    assert "2.0000" in rows["10"] and " - " in rows["40"] and "eval loss" in r.output


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft's own
def test_merged_model_loads_alone_and_matches_base_with_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rd = make_run(tmp_path, {10: 1.0})
    code, out = export(rd.uri, "--step", "10", "--merge", str(tmp_path / "merged"))
    assert code == 0, out
    assert "step 10 merged" in out and "no tokenizer" in out
    names = {p.name for p in (tmp_path / "merged").iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("adapter") for n in names)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.use_cache is True
    export_step(rd, 10, str(tmp_path / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))
    peft = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids = torch.randint(0, BYTE_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = peft(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"))(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter did change the model


@pytest.mark.timeout(180)
def test_merged_model_carries_the_bases_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rd = make_run(tmp_path, {5: 1.5}, chat=True)
    out_dir = tmp_path / "merged"
    assert export_merged(rd, 5, str(out_dir))  # tokenizer files copied
    tok, base_tok = (
        AutoTokenizer.from_pretrained(str(out_dir)),
        AutoTokenizer.from_pretrained(str(tmp_path / "base")),
    )
    text = "hello there, a tokenizer test"
    assert tok(text)["input_ids"] == base_tok(text)["input_ids"]
    assert tok.chat_template == base_tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    assert model.config.vocab_size == len(tok)
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]


@pytest.fixture(scope="module")
def no_eval_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noeval")
    return make_run(tmp, {10: None, 20: None}), tmp


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args,says",
    [
        (["--best"], "eval.split or eval.path"),
        (["--step", "10", "--best"], "--step and --best"),
        ([], "--step N or --best"),
        (["--step", "10", "--merge", "--compress", "compeft"], "--merge"),
    ],
)
def test_export_refusals_are_one_line_exit_2(no_eval_run, args, says):
    rd, tmp = no_eval_run
    code, out = export(rd.uri, *args, str(tmp / "out"))
    assert code == 2, out
    assert out.startswith("error: ") and says in out and out.count("\n") == 1, out
    assert not (tmp / "out").exists()
