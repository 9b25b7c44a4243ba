"""The staged training data and a deterministic, resumable data order.

Contract: `StagedData(folder)` opens what `prep.prepare` wrote (memory-mapped). A data step's
sequences are a pure function of (seed, number of sequences, global batch, data step) alone:
`microbatch(data_step, i)` cuts them into the same microbatches at every world size, and
`share(count, rank, world)` says which of them a rank trains on (rank r takes microbatch r,
r + world, ...), so a job that shrinks or grows sums exactly the same microbatches per step.
A run resumes its data order by restoring `data_step` alone.
"""

from __future__ import annotations

import json
import os

import torch

from resilient.training.encode import BYTE_VOCAB, ByteTokenizer  # noqa: F401 (re-exported)
from resilient.training.prep import EVAL_FILE, STATS_FILE, TRAIN_FILE
from resilient.training.rows import RowTable, collate, open_rows

LEGACY_FILE = "samples.safetensors"  # what runs staged before the Arrow layout


class StagedData:
    """The staged sets of a run (`prep.prepare`'s folder), memory-mapped: `train` and `eval`
    (None without evaluation) are `RowTable`s, `batch(table, indices)` a microbatch of the model's
    keyword arguments, `tokens(indices)` the training tokens of those sequences."""

    def __init__(self, folder: str):
        if not os.path.exists(os.path.join(folder, TRAIN_FILE)):
            self.train, self.eval, self.stats = _legacy(folder), None, {"mode": "chunks"}
        else:
            self.train = open_rows(os.path.join(folder, TRAIN_FILE))
            path = os.path.join(folder, EVAL_FILE)
            self.eval = open_rows(path) if os.path.exists(path) else None
            with open(os.path.join(folder, STATS_FILE)) as f:
                self.stats = json.load(f)
        self.mode, self.pad = self.stats["mode"], int(self.stats.get("pad_id", 0))

    def batch(self, table: RowTable, indices: list[int]) -> dict[str, torch.Tensor]:
        return collate([table.row(i) for i in indices], self.mode, self.pad)

    def tokens(self, indices) -> int:
        return sum(len(self.train.get("input_ids", i)) for i in indices)


def _legacy(folder: str) -> RowTable:
    """A run staged before the Arrow layout: its [n, seq_len] samples, trained on every token."""
    import pyarrow as pa
    from safetensors.torch import load_file

    samples = load_file(os.path.join(folder, LEGACY_FILE))["samples"].numpy()
    n, width = samples.shape
    offsets = pa.array(range(0, (n + 1) * width, width), type=pa.int32())
    col = pa.ListArray.from_arrays(offsets, pa.array(samples.reshape(-1)))
    lengths = pa.ListArray.from_arrays(
        pa.array(range(n + 1), type=pa.int32()), pa.array([width] * n, type=pa.int32())
    )
    return RowTable(pa.table({"input_ids": col, "labels": col, "lengths": lengths}))


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
