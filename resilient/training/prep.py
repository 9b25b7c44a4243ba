"""The training and evaluation sets, read through Hugging Face `datasets`, tokenised and laid out
as the ranks will read them.

Contract: `prepare(spec, tokenizer, out_dir, tmp)` reads `data.path` (and `eval.path`), renders
each row of `data.format` (`formats`), tokenises it with its loss labels (`encode`) in parallel
(`datasets.map`, `data.num_proc`), holds out `eval.split` of the usable samples (seeded by
`train.seed`) and writes `out_dir/train.arrow` (and `eval.arrow`): "chunks" (text without packing:
documents concatenated and cut into seq_len sequences, as before), "packed" (`packing`) or "padded"
(one sample a sequence). It returns the stats (`stats.json` beside them): rows read, samples used,
bad rows by reason, truncated, sequences, tokens, trained tokens, seconds. Nothing of the user's is
written to: every cache lives in `tmp`. A source that cannot be read, or that has no usable row,
raises `SpecError` naming the field; a row that cannot be trained on is counted, never fatal.
`rows_mode(spec)` says which layout a spec gets.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator

import numpy as np

from resilient import cpus
from resilient.errors import SpecError
from resilient.training.encode import Encoder, pad_id
from resilient.training.formats import BLANK, REASONS, BadRow, ChatTemplate, segments
from resilient.training.packing import pack
from resilient.training.rows import IGNORE, RowTable, write_rows

KINDS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
KINDS |= {".csv": "csv", ".arrow": "arrow"}
SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
PARALLEL_FROM = 20_000  # rows: below this, one process tokenises faster than a pool starts
TRAIN_FILE, EVAL_FILE, STATS_FILE = "train.arrow", "eval.arrow", "stats.json"


def rows_mode(spec) -> str:
    _, packing = spec.data.resolved()
    return "chunks" if packing is None else "packed" if packing else "padded"


def _quiet() -> None:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()


def load_source(path: str, field: str, cache: str):
    """A `datasets.Dataset` of the rows at `path` (a file, a folder of files or a save_to_disk
    folder, local or an fsspec URI)."""
    import datasets
    import fsspec

    _quiet()
    try:
        fs, root = fsspec.core.url_to_fs(path)
        if fs.isdir(root):
            if any(fs.exists(f"{root}/{s}") for s in SAVED):
                return _one_split(datasets.load_from_disk(path), field)
            files = [f for f in fs.find(root) if os.path.splitext(f)[1] in KINDS]
        elif fs.isfile(root):
            if not fs.size(root):
                raise SpecError(f"{field} {path!r} is empty; give a file with rows")
            files = [root]
        else:
            raise SpecError(f"{field} {path!r} does not exist; give a data file or folder")
        kinds = {KINDS.get(os.path.splitext(f)[1], "text") for f in files}
        if len(kinds) != 1:
            raise SpecError(
                f"{field} {path!r}: {'no data files' if not kinds else 'mixed kinds ' + str(kinds)}"
                f"; give files of one kind ({', '.join(sorted(KINDS))})"
            )
        proto = path.split("://", 1)[0] + "://" if "://" in path else ""
        data_files = [proto + f if proto and "://" not in f else f for f in files]
        kind = kinds.pop()
        extra = _csv_as_text(data_files[0]) if kind == "csv" else {}
        return datasets.load_dataset(
            kind, data_files=data_files, split="train", cache_dir=cache, **extra
        )
    except SpecError:
        raise
    except Exception as e:  # any reader's or filesystem's refusal, spelled its own way
        if type(e).__name__ == "DatasetGenerationError" and e.__cause__:  # says only "an error"
            e = e.__cause__
        raise SpecError(
            f"{field} {path!r} cannot be read ({type(e).__name__}: {str(e)[:200]}); give a "
            f"jsonl/json/parquet/csv/arrow/txt file (UTF-8), a folder of them or a save_to_disk "
            "folder"
        ) from None


def _csv_as_text(first: str) -> dict:
    """CSV cells are text: pandas would make " 42" a number and an empty cell NaN."""
    import datasets
    import fsspec
    import pandas as pd

    with fsspec.open(first) as f:
        names = list(pd.read_csv(f, nrows=0).columns)
    string = datasets.Value("string")
    return {"features": datasets.Features(dict.fromkeys(names, string)), "keep_default_na": False}


def _one_split(ds, field: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds or len(ds) == 1:
            return ds["train"] if "train" in ds else next(iter(ds.values()))
        raise SpecError(f"{field}: a DatasetDict with splits {list(ds)}; give one split's folder")
    return ds


class _EncodeBatch:
    """The `datasets.map` function: rows to (input_ids, labels, reason, truncated); picklable
    (the template is compiled in each process on first use)."""

    def __init__(self, spec, tokenizer, template: str | None, chunks: bool):
        train_on, _ = spec.data.resolved()
        self.fmt, self.template_src, self.chunks = spec.data.format, template, chunks
        self.encoder = Encoder(tokenizer, spec.data.seq_len, train_on, spec.data.too_long)
        self.bos, self.eos = _specials(tokenizer)
        self.template = None

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        if self.template is None and self.template_src:
            self.template = ChatTemplate(self.template_src, self.bos, self.eos)
        n = len(next(iter(batch.values())))
        out: dict[str, list] = {"input_ids": [], "labels": [], "reason": [], "truncated": []}
        for i in range(n):
            row = {k: v[i] for k, v in batch.items()}
            ids, labels, reason, cut = [], [], "", False
            try:
                segs = segments(row, self.fmt, self.template)
                if self.chunks:
                    ids, _ = self.encoder.ids(segs)
                else:
                    ids, labels, cut = self.encoder.sample(segs)
            except BadRow as e:
                reason = e.reason
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["reason"].append(reason)
            out["truncated"].append(cut)
        return out


def _encode(spec, tokenizer, ds, template, chunks: bool, cache: str, tag: str):
    import datasets

    n = spec.data.num_proc or (min(8, cpus.affinity()) if len(ds) >= PARALLEL_FROM else 1)
    feats = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "reason": datasets.Value("string"),
            "truncated": datasets.Value("bool"),
        }
    )
    return datasets.Dataset.map(
        ds,
        _EncodeBatch(spec, tokenizer, template, chunks),
        batched=True,
        batch_size=1000,
        num_proc=n if n > 1 else None,
        remove_columns=ds.column_names,
        features=feats,
        cache_file_name=os.path.join(cache, f"{tag}-encoded.arrow"),
        load_from_cache_file=False,
        new_fingerprint=f"resilient-{tag}",
    ), n


def _template(spec, tokenizer) -> str | None:
    if spec.data.format != "chat":
        return None
    source = spec.data.chat_template or getattr(tokenizer, "chat_template", None)
    if not source:
        raise SpecError(
            'data.format = "chat" needs a chat template, and the model\'s tokenizer has none: '
            "set data.chat_template (a Jinja template, e.g. "
            "'{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}')"
        )
    return source


def _specials(tokenizer) -> tuple[str, str]:
    """The tokenizer's (bos, eos) tokens for a chat template ("" where it has none)."""
    return getattr(tokenizer, "bos_token", "") or "", getattr(tokenizer, "eos_token", "") or ""


def _first_bad(ds, fmt: str, template: str | None, tokenizer) -> str:
    """What is wrong with the first row `segments` refuses, and the fields it has: the counts
    say how many rows, this says which field (e.g. alpaca's `instruction` on chat rows)."""
    chat = ChatTemplate(template, *_specials(tokenizer)) if template else None
    for i in range(min(len(ds), 100)):  # a bounded look: the counts above cover every row
        row = ds[i]
        try:
            segments(row, fmt, chat)
        except BadRow as e:
            if e.reason == BLANK:
                continue
            fields = ", ".join(k for k, v in row.items() if v is not None)
            return f"; row {i + 1}: {e} (its fields: {fields or 'none'})"
        return ""  # its text is fine: the encoder refused it (too long, no trained tokens)
    return ""


def _counts(enc) -> tuple[dict[str, int], int]:
    import pyarrow.compute as pc

    table = enc.data.table
    counts = {}
    for v in pc.value_counts(table.column("reason")).to_pylist():
        if v["values"]:
            counts[v["values"]] = v["counts"]
    bad = {r: counts[r] for r in REASONS if r in counts}
    bad[BLANK] = counts.get(BLANK, 0)  # popped by the caller: blank lines are not mistakes
    truncated = int(pc.sum(table.column("truncated")).as_py() or 0)
    return bad, truncated


def _good(enc) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.indices_nonzero(pc.equal(enc.data.table.column("reason"), "")).to_numpy()


def _chunks(table: RowTable, idx: np.ndarray, seq_len: int) -> Iterator[dict]:
    """Documents concatenated in order and cut into seq_len sequences (the tail left over)."""
    buf = np.zeros(0, dtype=np.int32)
    for i in idx.tolist():
        buf = np.concatenate([buf, table.get("input_ids", i)])
        while len(buf) >= seq_len:
            ids, buf = buf[:seq_len], buf[seq_len:]
            yield {"input_ids": ids, "labels": ids, "lengths": [seq_len]}


def _padded(table: RowTable, idx: np.ndarray) -> Iterator[dict]:
    for i in idx.tolist():
        ids = table.get("input_ids", i)
        yield {"input_ids": ids, "labels": table.get("labels", i), "lengths": [len(ids)]}


def _packed(table: RowTable, idx: np.ndarray, seq_len: int) -> Iterator[dict]:
    lengths = [len(table.get("input_ids", i)) for i in idx.tolist()]
    for members in pack(lengths, seq_len):
        picks = [int(idx[m]) for m in members]
        yield {
            "input_ids": np.concatenate([table.get("input_ids", i) for i in picks]),
            "labels": np.concatenate([table.get("labels", i) for i in picks]),
            "lengths": [lengths[m] for m in members],
        }


def _write(path: str, rows: Iterator[dict]) -> dict[str, int]:
    """Write the sequences; their count, tokens and tokens with loss."""
    tally = {"sequences": 0, "tokens": 0, "trained_tokens": 0}

    def counted() -> Iterator[dict]:
        for r in rows:
            tally["tokens"] += len(r["input_ids"])
            tally["trained_tokens"] += int((np.asarray(r["labels"]) != IGNORE).sum())
            yield r

    tally["sequences"] = write_rows(path, counted())
    return tally


def _layout(mode: str, table: RowTable, idx: np.ndarray, seq_len: int) -> Iterator[dict]:
    if mode == "chunks":
        return _chunks(table, idx, seq_len)
    return _packed(table, idx, seq_len) if mode == "packed" else _padded(table, idx)


def _split(good: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held out): a seeded `fraction` of the usable samples, each part in file order."""
    if not fraction:
        return good, good[:0]
    perm = np.random.default_rng(seed).permutation(len(good))
    k = max(1, round(fraction * len(good)))
    return np.sort(good[perm[k:]]), np.sort(good[perm[:k]])


def _read(spec, tokenizer, path: str, field: str, tmp: str, tag: str, chunks: bool):
    t0 = time.perf_counter()
    ds = load_source(path, field, os.path.join(tmp, "hf-cache"))
    template = _template(spec, tokenizer)
    enc, procs = _encode(spec, tokenizer, ds, template, chunks, tmp, tag)
    bad, truncated = _counts(enc)
    blank = bad.pop(BLANK)
    good = _good(enc)
    if len(good) == 0:
        why = ", ".join(f"{n} {r}" for r, n in bad.items()) or "it is empty"
        why += _first_bad(ds, spec.data.format, template, tokenizer)
        raise SpecError(
            f"{field} {path!r}: none of its {len(ds)} rows can be trained on ({why}); check "
            f"data.format ({spec.data.format!r}) against the rows' fields"
        )
    stats = {"rows": len(ds) - blank, "bad_rows": int(sum(bad.values())), "bad": bad}
    stats |= {"truncated": truncated, "num_proc": procs}
    stats["tokenise_s"] = round(time.perf_counter() - t0, 3)
    return RowTable(enc.data.table, ("input_ids", "labels")), good, stats


def prepare(spec, tokenizer, out_dir: str, tmp: str) -> dict:
    """See the module's contract; `tmp` holds every cache (deleted by the caller)."""
    mode, d = rows_mode(spec), spec.data
    table, good, stats = _read(spec, tokenizer, d.path, "data.path", tmp, "train", mode == "chunks")
    train, held = _split(good, spec.eval.split, spec.train.seed)
    os.makedirs(out_dir, exist_ok=True)
    stats |= {"format": d.format, "train_on": d.resolved()[0], "mode": mode, "used": len(train)}
    stats["pad_id"] = pad_id(tokenizer)
    if d.chat_template and d.format != "chat":  # e.g. --set data.format=... on a chat spec
        stats["unused_template"] = True
    stats |= _write(os.path.join(out_dir, TRAIN_FILE), _layout(mode, table, train, d.seq_len))
    if stats["sequences"] == 0:
        raise SpecError(
            f"data.path {d.path!r} holds fewer than data.seq_len={d.seq_len} tokens; give more "
            "text or lower data.seq_len"
        )
    eval_mode = "chunks" if mode == "chunks" else "padded"  # evaluation never packs
    if spec.eval.path:
        etable, held, estats = _read(
            spec, tokenizer, spec.eval.path, "eval.path", tmp, "eval", mode == "chunks"
        )
        stats["eval_bad_rows"] = estats["bad_rows"]
    else:
        etable = table
    if len(held):
        e = _write(os.path.join(out_dir, EVAL_FILE), _layout(eval_mode, etable, held, d.seq_len))
        stats |= {"eval_samples": len(held), "eval_sequences": e["sequences"]}
        stats["eval_trained_tokens"] = e["trained_tokens"]
    stats["samples_per_s"] = round(stats["rows"] / max(stats["tokenise_s"], 1e-9), 1)
    with open(os.path.join(out_dir, STATS_FILE), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
    return stats


MODE_WORDS = {"chunks": "chunked"}  # the stats' name of a mode, as the summary line says it


def summary(stats: dict) -> str:
    """One line for the launch output: what was read, used, left out and why."""
    held = f" (+{stats['eval_samples']:,} held out for eval)" if stats.get("eval_samples") else ""
    mode = MODE_WORDS.get(stats["mode"], stats["mode"])
    line = (
        f"data: {stats['rows']:,} rows -> {stats['used']:,} samples in {stats['sequences']:,} "
        f"{mode} sequences{held}; {stats['tokens']:,} tokens, "
        f"{stats['trained_tokens']:,} with loss ({stats['train_on']})"
    )
    if stats["bad_rows"]:
        why = ", ".join(f"{r} {n:,}" for r, n in stats["bad"].items())
        line += f"; {stats['bad_rows']:,} bad rows left out ({why})"
    if stats["truncated"]:
        line += f"; {stats['truncated']:,} truncated to data.seq_len"
    if stats.get("unused_template"):
        line += f"; data.chat_template unused (data.format is {stats['format']!r})"
    procs = stats["num_proc"]
    return line + (
        f"; tokenised in {stats['tokenise_s']:.1f}s ({stats['samples_per_s']:,.0f} rows/s, "
        f"{procs} process{'es' if procs > 1 else ''})"
    )


def steps_for(spec, stats: dict) -> int:
    """train.steps for train.epochs passes over the training sequences."""
    return max(1, math.ceil(spec.train.epochs * stats["sequences"] / spec.global_batch()))
