"""Training sequences on disk: an Arrow file, memory-mapped, read a microbatch at a time.

Contract: `write_rows(path, rows)` writes sequences (dicts of `input_ids`, `labels` with -100 on
tokens without loss, and `lengths`: the samples packed into the sequence, in order) as an Arrow IPC
file, in record batches of BATCH rows. `RowTable(table)` reads any Arrow table with such list
columns without copying it (a memory-mapped file stays on disk: the whole set is never one
in-memory tensor); `open_rows(path)` maps a file. `collate(rows, mode, pad_id)` pads a microbatch
on the right: mode "packed" adds position ids that restart at each sample and a block-diagonal
causal attention mask (no attention across samples); "padded" and "chunks" need neither (right
padding under a causal mask is never attended to).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import torch

BATCH = 4096
COLUMNS = ("input_ids", "labels", "lengths")
SCHEMA = pa.schema([(c, pa.list_(pa.int32())) for c in COLUMNS])
IGNORE = -100  # the label of a token without loss (Hugging Face's ignore index)


def write_rows(path: str, rows: Iterable[dict]) -> int:
    """Write `rows` to `path`; the number written."""
    n, buf = 0, {c: [] for c in COLUMNS}
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as w:
        for row in rows:
            for c in COLUMNS:
                buf[c].append(np.asarray(row[c], dtype=np.int32))
            n += 1
            if len(buf["input_ids"]) >= BATCH:
                w.write_batch(_batch(buf))
                buf = {c: [] for c in COLUMNS}
        if buf["input_ids"] or n == 0:
            w.write_batch(_batch(buf))
    return n


def _batch(buf: dict[str, list]) -> pa.RecordBatch:
    return pa.record_batch([pa.array(buf[c], type=pa.list_(pa.int32())) for c in COLUMNS], SCHEMA)


class RowTable:
    """Random access to the int list columns of an Arrow table, chunk by chunk, without copies."""

    def __init__(self, table: pa.Table, columns: tuple[str, ...] = COLUMNS):
        self.n = table.num_rows
        self._cols: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        starts = None
        for c in columns:
            if c not in table.column_names:
                continue
            parts, lens = [], []
            for chunk in table.column(c).chunks:
                if len(chunk) == 0:
                    continue
                offsets = chunk.offsets.to_numpy(zero_copy_only=False)
                parts.append((offsets, chunk.values.to_numpy(zero_copy_only=False)))
                lens.append(len(chunk))
            self._cols[c] = parts
            if starts is None:
                starts = np.concatenate([[0], np.cumsum(lens)]).tolist()
        self._starts = starts or [0]

    def __len__(self) -> int:
        return self.n

    def has(self, column: str) -> bool:
        return column in self._cols

    def get(self, column: str, i: int) -> np.ndarray:
        """Row `i` of `column` (a view into the table)."""
        if not 0 <= i < self.n:
            raise IndexError(f"row {i} of {self.n}")
        k = bisect.bisect_right(self._starts, i) - 1
        offsets, values = self._cols[column][k]
        j = i - self._starts[k]
        return values[offsets[j] : offsets[j + 1]]

    def row(self, i: int) -> dict[str, np.ndarray]:
        return {c: self.get(c, i) for c in self._cols}


def open_rows(path: str) -> RowTable:
    """The sequences `write_rows` wrote to `path`, memory-mapped."""
    return RowTable(pa.ipc.open_file(pa.memory_map(path, "r")).read_all())


def collate(rows: list[dict[str, np.ndarray]], mode: str, pad_id: int) -> dict[str, torch.Tensor]:
    """A microbatch of rows as the model's keyword arguments (`input_ids`, `labels`, and for
    "packed" `position_ids` and `attention_mask`)."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.from_numpy(r["input_ids"].astype(np.int64))
        labels[b, :n] = torch.from_numpy(r["labels"].astype(np.int64))
    out = {"input_ids": ids, "labels": labels}
    if mode == "packed":
        out.update(_packed(rows, width))
    return out


def _packed(rows: list[dict[str, np.ndarray]], width: int) -> dict[str, torch.Tensor]:
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    seg = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding, its own block
    for b, r in enumerate(rows):
        at = 0
        for k, n in enumerate(r["lengths"].tolist()):
            pos[b, at : at + n] = torch.arange(n)
            seg[b, at : at + n] = k
            at += n
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = (seg[:, :, None] == seg[:, None, :]) & causal
    return {"position_ids": pos, "attention_mask": mask[:, None]}
