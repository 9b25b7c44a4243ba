"""Tokenised corpus and a deterministic, resumable data order.

Contract: a data step's samples are a pure function of (seed, number of samples, global batch,
data step) alone: `microbatches(data_step)` cuts them into the same microbatches at every world
size, and `share(count, rank, world)` says which of them a rank trains on (rank r takes microbatch
r, r + world, ...), so a job that shrinks or grows sums exactly the same microbatches per step.
A run resumes its data order by restoring `data_step` alone.
"""

from __future__ import annotations

import json

import torch

BYTE_VOCAB = 258  # 256 byte values, BOS, EOS


class ByteTokenizer:
    """UTF-8 bytes as tokens: the built-in model's tokenizer (needs no files, no download)."""

    vocab_size = BYTE_VOCAB
    bos_token_id = BYTE_VOCAB - 2
    eos_token_id = BYTE_VOCAB - 1

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def read_documents(path: str) -> list[str]:
    """Documents of a text file (one per non-empty line) or JSONL (the `text` field of each
    line)."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if path.endswith((".jsonl", ".json")):
                line = json.loads(line)["text"]
            docs.append(line)
    return docs


def tokenize_corpus(path: str, tokenizer, seq_len: int) -> torch.Tensor:
    """All documents, each ended by EOS, concatenated and cut into [n, seq_len] samples."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in read_documents(path):
        ids.extend(tokenizer.encode(doc))
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"data.path {path!r} holds fewer than data.seq_len={seq_len} tokens")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


SAMPLES_FILE = "samples.safetensors"


def save_samples(samples: torch.Tensor, out_dir: str) -> None:
    """The tokenised corpus as safetensors (int32: half the bytes, every vocabulary fits)."""
    from safetensors.torch import save_file

    save_file({"samples": samples.to(torch.int32).contiguous()}, f"{out_dir}/{SAMPLES_FILE}")


def load_samples(in_dir: str) -> torch.Tensor:
    """What `save_samples` wrote, as the [n, seq_len] long tensor `tokenize_corpus` returns."""
    from safetensors.torch import load_file

    return load_file(f"{in_dir}/{SAMPLES_FILE}")["samples"].to(torch.long)


class DataOrder:
    """Which samples each data step (1-based) trains on, epoch after epoch: `global_batch` samples
    a step, in microbatches of `micro_batch`."""

    def __init__(self, num_samples: int, global_batch: int, micro_batch: int, seed: int):
        if global_batch % micro_batch:
            raise ValueError(f"global batch {global_batch} is not a multiple of {micro_batch}")
        self.n, self.batch, self.micro, self.seed = num_samples, global_batch, micro_batch, seed
        self._perms: dict[int, torch.Tensor] = {}  # the newest few epochs' permutations

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
            if len(self._perms) > 4:
                del self._perms[min(self._perms)]
        return self._perms[epoch]

    @property
    def count(self) -> int:
        """Microbatches per data step."""
        return self.batch // self.micro

    def microbatch(self, data_step: int, index: int) -> list[int]:
        """The sample indices of microbatch `index` of `data_step`."""
        start = (data_step - 1) * self.batch + index * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, i = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[i]))
        return out


def share(count: int, rank: int, world: int) -> list[int]:
    """The microbatches (of `count`) that `rank` of `world` ranks trains on: every world-th one, so
    the shares differ by at most one microbatch."""
    return list(range(rank, count, world))
