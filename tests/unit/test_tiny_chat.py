import subprocess
import sys

import pytest
import torch

from resilient.training.tiny_chat import (
    CHAT_TEMPLATE,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    build_tiny_chat_model,
    build_tokenizer,
)

MESSAGES = [
    {"role": "system", "content": "you are a careful calculator."},
    {"role": "user", "content": "what is 12 plus 34?"},
    {"role": "assistant", "content": "12 plus 34 is 46."},
]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    """One build shared by the read-only tests (the build is what the determinism test checks)."""
    out = tmp_path_factory.mktemp("tiny_chat")
    build_tiny_chat_model(str(out))
    return out


def _load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path)), AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.timeout(120)
def test_loads_with_auto_classes(chat_dir):
    tok, model = _load(chat_dir)
    assert tok.is_fast
    assert tok.chat_template == CHAT_TEMPLATE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    cfg = model.config
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )


@pytest.mark.timeout(120)
def test_chat_template_renders_role_tokens(chat_dir):
    tok, _ = _load(chat_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == (
        "<|system|>you are a careful calculator.<|end|>"
        "<|user|>what is 12 plus 34?<|end|>"
        "<|assistant|>12 plus 34 is 46.<|end|>"
    )
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|end|><|assistant|>")
    assert not tok.apply_chat_template(MESSAGES[:2], tokenize=False).endswith("<|assistant|>")


@pytest.mark.timeout(120)
def test_special_tokens_are_single_tokens(chat_dir):
    tok, _ = _load(chat_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))  # the trainer puts them first, in order
    for token, i in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token, add_special_tokens=False) == [i]
        assert tok.encode(f"x {token} y", add_special_tokens=False).count(i) == 1
    assert set(ROLE_TOKENS) <= set(tok.all_special_tokens)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == (
        "you are a careful calculator.what is 12 plus 34?12 plus 34 is 46."
    )


@pytest.mark.timeout(120)
def test_offsets_mapping_and_byte_level_round_trip(chat_dir):
    tok, _ = _load(chat_dir)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    enc = tok(text, return_offsets_mapping=True)
    spans = enc["offset_mapping"]
    assert len(spans) == len(enc["input_ids"])
    # Untrimmed character offsets tile the text: each token starts where the previous one ended.
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert "".join(text[a:b] for a, b in spans) == text
    for sample in [
        text,
        "Hello, World! ~`{}|",
        " lead\tand\ntrail  ",
        "".join(map(chr, range(128))),
    ]:
        assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    # Any text encodes, even what training never saw: no unknown token exists.
    assert tok.unk_token is None
    assert tok.decode(tok.encode("héllo ✓ 日本", add_special_tokens=False)) == "héllo ✓ 日本"


@pytest.mark.timeout(120)
def test_model_runs_on_chat_text_and_covers_the_vocab(chat_dir):
    tok, model = _load(chat_dir)
    assert model.config.vocab_size == len(tok) == 512
    assert max(tok.get_vocab().values()) == len(tok) - 1
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert model.get_output_embeddings().out_features == len(tok)
    batch = tok(
        [tok.apply_chat_template(MESSAGES, tokenize=False), "12 plus 34 is 46."],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.loss)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


@pytest.mark.timeout(120)
def test_builds_are_deterministic_across_processes(tmp_path, chat_dir):
    """A second build, in a fresh process (the tokenizers library's hash maps are seeded per
    process), writes the same tokenizer.json bytes and the same weights."""
    again = tmp_path / "again"
    code = "import sys; from resilient.training.tiny_chat import build_tiny_chat_model as b; "
    code += "b(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(again)], check=True)
    assert (again / "tokenizer.json").read_bytes() == (chat_dir / "tokenizer.json").read_bytes()
    a, b = _weights(chat_dir), _weights(again)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.timeout(120)
def test_tokenizer_alone_and_vocab_size(tmp_path):
    from transformers import AutoTokenizer

    one, two = tmp_path / "one", tmp_path / "two"
    build_tokenizer(str(one), vocab_size=300)
    build_tokenizer(str(two), vocab_size=300)
    assert (one / "tokenizer.json").read_bytes() == (two / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(str(one))  # no config.json: the tokenizer files suffice
    assert len(tok) == 300
    assert tok.apply_chat_template(MESSAGES[:1], tokenize=False).startswith("<|system|>")
    with pytest.raises(ValueError, match="256 byte tokens"):
        build_tokenizer(str(tmp_path / "small"), vocab_size=200)
