"""Fine-tuning data: formats, loss masks, packing without attention across samples, bad rows,
evaluation split, every common source (no Ray)."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from resilient.config import validate_tree
from resilient.errors import SpecError
from resilient.training.data import BYTE_VOCAB, StagedData
from resilient.training.encode import ByteTokenizer, Encoder, load_tokenizer
from resilient.training.evaluation import EvalState
from resilient.training.formats import BadRow, ChatTemplate, segments
from resilient.training.model import build_tiny_llama
from resilient.training.packing import pack
from resilient.training.prep import prepare
from resilient.training.rows import IGNORE, collate, open_rows, write_rows
from resilient.training.tiny_chat import build_tiny_chat_model

pytestmark = pytest.mark.timeout(120)
TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
CHAT = [{"role": "user", "content": "what is 1 plus 2?"}, {"role": "assistant", "content": "3."}]


def _spec(path, **data):
    extra = {k: data.pop(k) for k in ("eval", "train") if k in data}
    return validate_tree({"name": "t", "data": {"path": str(path), **data}, **extra})


def test_each_format_marks_its_completion():
    assert segments({"prompt": "1+2=", "completion": "3"}, "prompt_completion") == [
        ("1+2=", False),
        ("3", True),
    ]
    (prompt, p), (out, o) = segments(
        {"instruction": "add", "input": "1 2", "output": "3"}, "alpaca"
    )
    assert (
        "### Instruction:\nadd" in prompt
        and "### Input:\n1 2" in prompt
        and (p, o, out)
        == (
            False,
            True,
            "3",
        )
    )
    segs = segments({"messages": CHAT}, "chat", ChatTemplate(TEMPLATE))
    assert "".join(t for t, _ in segs) == "<|user|>what is 1 plus 2?<|end|><|assistant|>3.<|end|>"
    # the assistant's content and its end of turn carry loss; its role header does not
    assert [t for t, c in segs if c] == ["3.<|end|>"]


@pytest.mark.parametrize(
    "row,fmt,reason",
    [
        ({"text": "x"}, "chat", "missing field"),
        ({"messages": [{"role": "robot", "content": "beep"}]}, "chat", "wrong role"),
        (
            {"messages": [CHAT[0], {"role": "assistant", "content": " "}]},
            "chat",
            "empty completion",
        ),
        ({"messages": [CHAT[0]]}, "chat", "no assistant turn"),
        ({"messages": [{"role": "user", "content": 5}, CHAT[1]]}, "chat", "not text"),
        ({"prompt": "a"}, "prompt_completion", "missing field"),
        ({"prompt": "a", "completion": ""}, "prompt_completion", "empty completion"),
        ({"instruction": "a", "output": None}, "alpaca", "missing field"),
    ],
)
def test_bad_rows_are_named(row, fmt, reason):
    with pytest.raises(BadRow) as e:
        segments(row, fmt, ChatTemplate(TEMPLATE))
    assert e.value.reason == reason


def test_a_template_that_rewrites_earlier_turns_still_masks_the_assistant():
    # the last turn is rendered differently: not a prefix, so contents are found in the text
    t = ChatTemplate(
        "{% for m in messages %}{{ m.content }}{% if loop.last %}!{% endif %}|{% endfor %}"
    )
    segs = t.segments(CHAT)
    assert [s for s, c in segs if c] == ["3."]


def test_byte_and_bpe_tokenizers_mask_the_same_characters(tmp_path):
    build_tiny_chat_model(str(tmp_path / "m"))
    bpe = load_tokenizer("tiny-llama-chat", str(tmp_path / "m"))
    segs = ChatTemplate(bpe.chat_template).segments(CHAT)
    for tok in (ByteTokenizer(), bpe):
        ids, labels, cut = Encoder(tok, 512, "completion", "truncate").sample(segs)
        trained = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE]
        assert not cut and labels[0] == IGNORE and ids[-1] == tok.eos_token_id
        assert tok.decode(trained[:-1]).strip() == "3.<|end|>"  # and the EOS after it
    ids, labels, _ = Encoder(bpe, 512, "all", "truncate").sample(segs)
    assert all(lab != IGNORE for lab in labels[1:])


def test_too_long_is_cut_or_dropped_and_a_sample_without_loss_is_refused():
    segs = [("a" * 20, False), ("b" * 20, True)]
    ids, labels, cut = Encoder(ByteTokenizer(), 30, "completion", "truncate").sample(segs)
    assert cut and len(ids) == 30 and sum(lab != IGNORE for lab in labels) == 10
    with pytest.raises(BadRow, match="too long"):
        Encoder(ByteTokenizer(), 30, "completion", "drop").sample(segs)
    with pytest.raises(BadRow, match="no trained tokens"):
        Encoder(ByteTokenizer(), 15, "completion", "truncate").sample(segs)


def test_packing_fills_bins_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, 500).tolist()
    bins = pack(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == pack(lengths, 64)
    assert len(bins) <= sum(lengths) / 64 * 1.1 + 1  # best fit wastes little


def test_packed_samples_do_not_attend_to_each_other(tmp_path):
    """A packed sequence's logits equal each of its samples' logits alone (position ids restart,
    the mask is block-diagonal), and its loss only counts the samples' own targets."""
    from transformers import AutoModelForCausalLM

    build_tiny_llama(str(tmp_path / "base"), BYTE_VOCAB)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")).eval()
    a, b = np.arange(10, 22, dtype=np.int32), np.arange(40, 47, dtype=np.int32)
    row = {"input_ids": np.concatenate([a, b]), "labels": np.concatenate([a, b])}
    row["lengths"] = np.array([len(a), len(b)], dtype=np.int32)
    short = {"input_ids": a[:5], "labels": a[:5], "lengths": np.array([5], dtype=np.int32)}
    batch = collate([row, short], "packed", 0)
    assert batch["position_ids"][0].tolist() == list(range(12)) + list(range(7))
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"],
        ).logits
        alone = [model(input_ids=torch.from_numpy(x[None].astype(np.int64))).logits for x in (a, b)]
    assert torch.allclose(packed[0, :12], alone[0][0], atol=1e-5)
    assert torch.allclose(packed[0, 12:19], alone[1][0], atol=1e-5)
    assert torch.allclose(packed[1, :5], alone[0][0, :5], atol=1e-5)  # right padding is harmless


def test_rows_round_trip_memory_mapped(tmp_path):
    rows = [
        {"input_ids": [i] * (i + 1), "labels": [IGNORE] * (i + 1), "lengths": [i + 1]}
        for i in range(10_000)
    ]
    assert write_rows(str(tmp_path / "r.arrow"), iter(rows)) == 10_000
    t = open_rows(str(tmp_path / "r.arrow"))
    assert len(t) == 10_000 and t.get("input_ids", 9_999).tolist() == [9_999] * 10_000
    assert t.get("input_ids", 4_096).tolist() == [4_096] * 4_097  # across record batches


def _chat_file(path, n=50, bad=()):
    with open(path, "w") as f:
        for i in range(n):
            msgs = [
                {"role": "user", "content": f"what is {i} plus 1?"},
                {"role": "assistant", "content": f"{i + 1}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
        for row in bad:
            f.write(json.dumps(row) + "\n")
    return path


def test_chat_jsonl_counts_bad_rows_and_holds_out_a_seeded_split(tmp_path):
    src = _chat_file(tmp_path / "c.jsonl", 100, [{"text": "x"}, {"messages": [{"role": "bot"}]}])
    spec = _spec(
        src, format="chat", chat_template=TEMPLATE, packing=True, seq_len=128, eval={"split": 0.1}
    )
    stats = prepare(spec, ByteTokenizer(), str(tmp_path / "o"), str(tmp_path / "tmp"))
    assert stats["rows"] == 102 and stats["bad_rows"] == 2 and stats["used"] == 90
    assert stats["bad"] == {"missing field": 1, "wrong role": 1}
    assert stats["eval_samples"] == 10 and stats["mode"] == "packed"
    assert stats["sequences"] < 90  # packed: several samples a sequence
    again = prepare(spec, ByteTokenizer(), str(tmp_path / "o2"), str(tmp_path / "tmp2"))
    timing = ("tokenise_s", "samples_per_s")
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in stats.items() if k not in timing
    }
    a, b = StagedData(str(tmp_path / "o")), StagedData(str(tmp_path / "o2"))
    assert [a.eval.get("input_ids", i).tolist() for i in range(10)] == [
        b.eval.get("input_ids", i).tolist() for i in range(10)
    ]
    assert stats["trained_tokens"] < stats["tokens"]


def test_every_common_source_reads_alike(tmp_path):
    """jsonl, parquet, csv, a folder of files and a save_to_disk folder give the same rows."""
    import datasets

    rows = [{"prompt": f"{a} times 3 =", "completion": f" {3 * a}"} for a in range(40)]
    (tmp_path / "dir").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pc.parquet")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dir" / "part.parquet")
    with open(tmp_path / "pc.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "pc.csv"), index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    seen = []
    for name in ("pc.parquet", "pc.jsonl", "pc.csv", "dir", "saved"):
        spec = _spec(tmp_path / name, format="prompt_completion", seq_len=32)
        out = tmp_path / f"out-{name}"
        prepare(spec, ByteTokenizer(), str(out), str(tmp_path / f"tmp-{name}"))
        t = StagedData(str(out)).train
        seen.append([t.get("labels", i).tolist() for i in range(len(t))])
    assert all(s == seen[0] for s in seen) and len(seen[0]) == 40
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(
        ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"]
    )  # nothing written into the user's dataset


def test_no_usable_row_and_a_missing_template_are_spec_errors(tmp_path):
    src = _chat_file(tmp_path / "bad.jsonl", 0, [{"messages": [{"role": "robot"}]}] * 5)
    spec = _spec(src, format="chat", chat_template=TEMPLATE)
    with pytest.raises(SpecError, match="none of its 5 rows") as e:
        prepare(spec, ByteTokenizer(), str(tmp_path / "o"), str(tmp_path / "t"))
    assert "row 1: wrong role: robot (its fields: messages)" in str(e.value)
    spec = _spec(_chat_file(tmp_path / "ok.jsonl"), format="chat")
    with pytest.raises(SpecError, match="data.chat_template"):
        prepare(spec, ByteTokenizer(), str(tmp_path / "o2"), str(tmp_path / "t2"))
    with pytest.raises(SpecError, match="does not exist"):
        prepare(
            _spec(tmp_path / "nope.jsonl"), ByteTokenizer(), str(tmp_path / "o3"), str(tmp_path)
        )


def test_a_format_that_does_not_fit_the_rows_names_the_field_it_misses(tmp_path):
    """alpaca's `instruction` on chat rows: the message says which field, and what the rows hold
    (the counts alone said "600 missing field")."""
    spec = _spec(_chat_file(tmp_path / "chat.jsonl", 30), format="alpaca")
    with pytest.raises(SpecError) as e:
        prepare(spec, ByteTokenizer(), str(tmp_path / "o"), str(tmp_path / "t"))
    msg = str(e.value)
    assert "none of its 30 rows" in msg and "30 missing field" in msg, msg
    assert "row 1: missing field: instruction (its fields: messages)" in msg, msg
    assert "data.format ('alpaca')" in msg, msg


def test_early_stopping_state_survives_a_snapshot():
    cfg = validate_tree(
        {"name": "t", "data": {"path": "/x"}, "eval": {"split": 0.1, "early_stop_patience": 2}}
    ).eval
    s = EvalState()
    for step, loss in ((10, 2.0), (20, 1.5), (30, 1.6)):
        s.observe(step, {"step": step, "loss": loss}, cfg)
    assert s.stop is None and s.best_step == 20
    t = EvalState.from_meta(s.to_meta(30))
    t.observe(40, {"step": 40, "loss": 1.7}, cfg)
    assert t.stop and "best 1.5000 at step 20" in t.stop
    assert s.to_meta(30)["eval"]["loss"] == 1.6 and s.to_meta(31)["eval"] is None


@pytest.mark.parametrize(
    "tree,message",
    [
        ({"data": {"train_on": "completion"}}, "needs completions"),
        ({"eval": {"every": 10}}, "need an evaluation set"),
        ({"eval": {"split": 0.1, "path": "/e.jsonl"}}, "not both"),
        ({"eval": {"split": 0.9}}, "eval.split"),
        ({"data": {"format": "chat", "chat_template": "{% for %}"}}, "not a Jinja template"),
        ({"train": {"epochs": 0}}, "train.epochs"),
    ],
)
def test_spec_mistakes_name_the_key(tree, message):
    base = {"name": "t", "data": {"path": "/x.jsonl"}}
    for k, v in tree.items():
        base[k] = {**base.get(k, {}), **v}
    with pytest.raises(SpecError, match=message):
        validate_tree(base)


def test_epochs_give_the_steps_of_that_many_passes(tmp_path):
    from resilient.training.prep import steps_for

    spec = _spec(tmp_path / "x.jsonl", train={"epochs": 1.5, "batch_size": 4})
    assert steps_for(spec, {"sequences": 100}) == 19  # 150 sequences / 8 a step, rounded up


def test_a_separate_eval_set_is_read_alike_and_counted_apart(tmp_path):
    train = _chat_file(tmp_path / "train.jsonl", 40)
    held = _chat_file(tmp_path / "eval.jsonl", 12, [{"messages": [{"role": "bot"}]}])
    spec = _spec(train, format="chat", chat_template=TEMPLATE, eval={"path": str(held)})
    stats = prepare(spec, ByteTokenizer(), str(tmp_path / "o"), str(tmp_path / "t"))
    assert stats["used"] == 40 and stats["eval_samples"] == 12 and stats["eval_bad_rows"] == 1
    data = StagedData(str(tmp_path / "o"))
    assert len(data.eval) == 12 and data.mode == "padded"
    assert (data.eval.get("labels", 0) != IGNORE).sum() > 0


def test_an_fsspec_uri_is_read_like_a_local_path(tmp_path):
    """A file or a folder behind an fsspec URI (memory:// here; s3:// alike)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open(f"/sft-{tmp_path.name}/pc.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n")
    for uri in (f"memory://sft-{tmp_path.name}/pc.jsonl", f"memory://sft-{tmp_path.name}"):
        out = tmp_path / f"o{len(uri)}"
        stats = prepare(_spec(uri, format="prompt_completion"), ByteTokenizer(), str(out), str(out))
        assert (stats["rows"], stats["used"]) == (30, 30)


def test_alpaca_rows_train_on_the_output_only(tmp_path):
    rows = [{"instruction": "Add one.", "input": str(i), "output": str(i + 1)} for i in range(20)]
    rows.append({"instruction": "Say hi.", "output": "hi"})  # no input: the shorter prompt
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = _spec(path, format="alpaca", seq_len=256)
    stats = prepare(spec, ByteTokenizer(), str(tmp_path / "o"), str(tmp_path / "t"))
    t = StagedData(str(tmp_path / "o")).train
    assert stats["used"] == 21 and len(t) == 21
    trained = [bytes(x for x in t.get("labels", i) if 0 <= x < 256) for i in range(len(t))]
    assert b"hi" in trained and all(b"Instruction" not in x for x in trained)


def test_launch_derives_steps_from_epochs(tmp_path):
    from resilient.launcher.launch import _with_epochs

    spec = _spec(tmp_path / "x.jsonl", train={"epochs": 2, "batch_size": 4})
    assert _with_epochs(spec, {"sequences": 40}).train.steps == 10  # 80 sequences, 8 a step
    plain = _spec(tmp_path / "x.jsonl")
    assert _with_epochs(plain, {"sequences": 40}) is plain
