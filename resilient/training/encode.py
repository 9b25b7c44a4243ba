"""Text segments to token ids and loss labels, one sample at a time: a pure function.

Contract: `Encoder(tokenizer, seq_len, train_on, too_long)` turns `formats.segments(...)` output
into `(input_ids, labels, truncated)`: the segments tokenised as one text (a fast Hugging Face
tokenizer's offsets say which segment each token belongs to; the byte tokenizer encodes segment by
segment, which is the same), ended by EOS (unless the text ends with it already); labels are the
ids where a token carries loss (a completion segment's, or every token with train_on = "all") and
-100 elsewhere, the first token always -100 (nothing before it predicts it). EOS carries loss when
the last segment does. A sample longer than seq_len is cut to it (too_long = "truncate": returned
with truncated = True) or refused (`BadRow("too long")`); one left without any token that carries
loss is refused (`BadRow("no trained tokens")`). `load_tokenizer(spec, model_dir)` is the job's
tokenizer: the byte tokenizer of the built-in model, or the model directory's own.
"""

from __future__ import annotations

import bisect

from resilient.training.formats import BadRow
from resilient.training.rows import IGNORE

BYTE_VOCAB = 258  # 256 byte values, BOS, EOS


class ByteTokenizer:
    """UTF-8 bytes as tokens: the built-in model's tokenizer (needs no files, no download)."""

    vocab_size = BYTE_VOCAB
    bos_token_id = BYTE_VOCAB - 2
    eos_token_id = BYTE_VOCAB - 1
    bos_token = eos_token = ""  # no text spells them: a template cannot write them

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def load_tokenizer(builtin: str, model_dir: str):
    """The byte tokenizer for builtin "tiny-llama", else the model directory's own."""
    if builtin == "tiny-llama":
        return ByteTokenizer()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(model_dir)


def pad_id(tokenizer) -> int:
    """What pads a microbatch (never attended to, never trained on)."""
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, name, None)
        if v is not None:
            return int(v)
    return 0


def token_spans(tokenizer, segs: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
    """The ids of the segments' text, and for each id whether its segment is a completion."""
    if not getattr(tokenizer, "is_fast", False):  # no offsets: segment by segment
        ids, flags = [], []
        for text, completion in segs:
            part = (
                tokenizer.encode(text, add_special_tokens=False)
                if not isinstance(tokenizer, ByteTokenizer)
                else tokenizer.encode(text)
            )
            ids += part
            flags += [completion] * len(part)
        return ids, flags
    text, ends, marks, at = "", [], [], 0
    for t, completion in segs:
        text += t
        at += len(t)
        ends.append(at)
        marks.append(completion)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    flags = []
    for start, _end in enc["offset_mapping"]:
        k = min(bisect.bisect_right(ends, start), len(marks) - 1)
        flags.append(marks[k])
    return list(enc["input_ids"]), flags


class Encoder:
    def __init__(self, tokenizer, seq_len: int, train_on: str, too_long: str):
        self.tok, self.seq_len, self.all, self.drop = (
            tokenizer,
            seq_len,
            train_on == "all",
            too_long == "drop",
        )
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def ids(self, segs: list[tuple[str, bool]]) -> tuple[list[int], list[bool]]:
        """Token ids ended by EOS, and which carry loss (before any cut)."""
        ids, flags = token_spans(self.tok, segs)
        if self.eos is not None and (not ids or ids[-1] != self.eos):
            ids.append(int(self.eos))
            flags.append(segs[-1][1])
        if self.all:
            flags = [True] * len(ids)
        return ids, flags

    def sample(self, segs: list[tuple[str, bool]]) -> tuple[list[int], list[int], bool]:
        ids, flags = self.ids(segs)
        truncated = len(ids) > self.seq_len
        if truncated:
            if self.drop:
                raise BadRow("too long", f"{len(ids)} tokens")
            ids, flags = ids[: self.seq_len], flags[: self.seq_len]
        labels = [i if f else IGNORE for i, f in zip(ids, flags, strict=True)]
        labels[0] = IGNORE
        if all(x == IGNORE for x in labels):
            raise BadRow("no trained tokens")
        return ids, labels, truncated
