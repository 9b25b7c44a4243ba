"""`resilient data inspect`: the first sequences of a job as its ranks will see them.

Contract: `preview(spec, n)` prepares the data exactly as a launch does (`inputs.check_data`, in a
temporary folder: nothing is written anywhere else) and returns (its stats, the first `n`
sequences of the data order: step 1's microbatches in order, then step 2's...). Each sequence is
`{sequence, step, microbatch, tokens, trained_tokens, samples, lengths, text, trained_text,
parts}`: `tokens` counts its tokens (padding not included), `trained_tokens` those that carry
loss, `lengths` the tokens of each sample packed into it, `text` all of it decoded,
`trained_text` only what carries loss (runs joined by " | "), `parts` each sample as runs of
`{text, trained}`.
"""

from __future__ import annotations

import tempfile

import numpy as np

from resilient.config import JobSpec
from resilient.launcher import inputs, staging
from resilient.training.data import DataOrder, StagedData
from resilient.training.rows import IGNORE


def preview(spec: JobSpec, n: int) -> tuple[dict, list[dict]]:
    with tempfile.TemporaryDirectory(prefix="resilient-inspect-") as tmp:
        model = staging.model_dir(spec, tmp)
        folder, stats = inputs.check_data(spec, model, tmp)
        tok = inputs.tokenizer_of(spec, model)
        data = StagedData(folder)
        t = spec.train
        order = DataOrder(len(data.train), spec.global_batch(), t.batch_size, t.seed)
        out: list[dict] = []
        step = 1
        while len(out) < min(n, len(data.train)):
            for m in range(order.count):
                for i in order.microbatch(step, m):
                    if len(out) < n:
                        out.append({"step": step, "microbatch": m, **describe(data, i, tok)})
            step += 1
        return stats, out


def describe(data: StagedData, i: int, tok) -> dict:
    row = data.train.row(i)
    ids, trained = row["input_ids"], row["labels"] != IGNORE
    parts, at = [], 0
    for n in row["lengths"].tolist():
        parts.append(_runs(ids[at : at + n], trained[at : at + n], tok))
        at += n
    return {
        "sequence": i,
        "tokens": len(ids),
        "trained_tokens": int(trained.sum()),
        "samples": len(parts),
        "lengths": row["lengths"].tolist(),
        "text": tok.decode(ids.tolist()),
        "trained_text": " | ".join(p["text"] for s in parts for p in s if p["trained"]),
        "parts": parts,
    }


def _runs(ids: np.ndarray, trained: np.ndarray, tok) -> list[dict]:
    """The sample's tokens as runs that carry loss or not, decoded."""
    runs, start = [], 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or trained[k] != trained[start]:
            text = tok.decode(ids[start:k].tolist())
            runs.append({"text": text, "trained": bool(trained[start])})
            start = k
    return runs
