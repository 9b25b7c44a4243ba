"""A tiny chat model and its tokenizer, built locally (no download) for chat-format examples and
tests.

Contract: `build_tokenizer(dir)` trains a byte-level BPE on text the project generates itself and
saves it as a fast HF tokenizer carrying `CHAT_TEMPLATE`; `build_tiny_chat_model(dir)` saves that
tokenizer plus a tiny Llama sized to its vocabulary in the same folder, so that
`AutoTokenizer.from_pretrained(dir)` and `AutoModelForCausalLM.from_pretrained(dir)` both load it.
The same call writes the same bytes of `tokenizer.json` and the same weights every time.
Byte-level means any text encodes (there is no unknown token) and ASCII text decodes back to
itself; the role tokens and `<|bos|>`, `<|eos|>`, `<|pad|>` are each a single special token.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import TYPE_CHECKING

import torch

from resilient.training.corpus import WORDS, write_corpus
from resilient.training.model import BASE_SEED, TINY_LLAMA

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# Specials first, in this order, so that they hold the ids 0..6 whatever the trainer learns.
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SYSTEM_PROMPTS = ["you are a careful calculator.", "answer with one sentence."]
CORPUS_LINES = 2000
CHAT_LINES = 2000
TEXT_SEED = 0  # the training text, hence the vocabulary, is the same for every build


def _training_text() -> list[str]:
    """The tokenizer's training text: the project's arithmetic corpus plus chat-like turns."""
    # write_corpus only writes files; going through a scratch file reuses its generator exactly
    # instead of keeping a second copy of it here.
    with tempfile.TemporaryDirectory() as tmp:
        path = write_corpus(os.path.join(tmp, "corpus.txt"), lines=CORPUS_LINES, seed=TEXT_SEED)
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    r = random.Random(TEXT_SEED)
    for _ in range(CHAT_LINES):
        a, b = r.randrange(100), r.randrange(100)
        lines.append(f"what is {a} plus {b}?")
        lines.append(f"{a} plus {b} is {a + b}.")
        lines.append(f"{r.choice(WORDS)}, {r.choice(SYSTEM_PROMPTS)}")
    return lines


def _train_bpe(vocab_size: int):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `_training_text()`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give `text` back, not " " + text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # Untrimmed offsets tile the text (a token's leading space stays in its span), so masks built
    # from character spans, such as the assistant's turns, leave no character uncovered.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte in the alphabet, seen in training or not: nothing can encode as unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    return tok


def build_tokenizer(out_dir: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE (deterministic), save it with `CHAT_TEMPLATE` into `out_dir` and
    return it. `vocab_size` is an upper bound: the trainer stops when no pair is left to merge."""
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size={vocab_size} leaves no room for the 256 byte tokens")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(vocab_size),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        # Registered as special so that decode(..., skip_special_tokens=True) drops them too.
        extra_special_tokens=ROLE_TOKENS,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def build_tiny_chat_model(out_dir: str) -> None:
    """Save the tokenizer and a tiny Llama (TINY_LLAMA sizes, weights seeded with BASE_SEED) whose
    vocabulary and bos/eos/pad ids are the tokenizer's, together in `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(out_dir)
    # Not build_tiny_llama: it puts bos/eos at the top of the vocabulary and has no pad token,
    # while these ids must be the tokenizer's.
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_LLAMA,
    )
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)
