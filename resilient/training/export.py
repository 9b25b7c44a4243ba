"""Export any verified checkpoint of a run as a peft adapter directory (dense or ComPEFT-packed)
or merged into its base model.

Contract: `export_step(rundir, step, out_dir)` rebuilds the run's model with its adapter from
`spec.json`, loads the checkpoint's adapter tensors (checksums verified, safetensors only) and
saves a directory `PeftModel.from_pretrained` loads, naming the run's base model. It raises
`CheckpointInvalid` when the checkpoint is missing or damaged. `export_merged(rundir, step,
out_dir)` writes the adapter merged into the base (peft's `merge_and_unload`) as a model
directory `AutoModelForCausalLM.from_pretrained` loads alone (safetensors), with the staged base's
tokenizer files where it has any (UserError for a prompt-learning method: nothing to merge).
`best_step(rundir)` is the persisted step with the lowest eval loss in its manifest (ties: the
earlier), or UserError naming [eval] when none has one.
`export_compressed(..., density)` writes the same adapter as a ComPEFT update of its initial
state instead (`compeft.safetensors`, `compeft.json`, peft's `adapter_config.json`) and returns
(dense bytes, packed bytes);
`expand_dir(in_dir, out_dir, base)` rebuilds the initial state from the base model (the one the
adapter config names, or `base`) and writes the dense adapter back, or raises `UserError` when
the directory is not a ComPEFT export or the base gives another initial state.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from resilient.checkpoint.snapshot import Snapshot
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import validate_tree
from resilient.errors import UserError
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, SPEC_FILE, base_ref
from resilient.training import compeft
from resilient.training.adapter_io import write_adapter
from resilient.training.model import adapter_tensors, apply_adapter, load_base, load_trainable

ADAPTER, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PACKED, PACKED_META, FORMAT = "compeft.safetensors", "compeft.json", "resilient-compeft/1"
# What a base model directory may hold of its tokenizer (besides tokenizer*, *.tiktoken).
TOKENIZER_FILES = frozenset(
    {
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "spiece.model",
        "sentencepiece.bpe.model",
    }
)


def export_step(rundir: RunDir, step: int, out_dir: str) -> None:
    _new_dir(out_dir)
    spec, model, _ = _trained(rundir, step)
    write_adapter(model, out_dir, base_ref(rundir, spec.model.path))
    _readable_as_siblings(out_dir)


def _readable_as_siblings(out_dir: str) -> None:
    """safetensors writes its files 0600: each gets the mode of the JSON written beside it, so
    whoever may read the export's config may read its weights too."""
    names = os.listdir(out_dir)
    like = next((n for n in sorted(names) if n.endswith(".json")), None)
    for name in names if like else ():
        if name.endswith(".safetensors"):
            shutil.copymode(os.path.join(out_dir, like), os.path.join(out_dir, name))


def export_merged(rundir: RunDir, step: int, out_dir: str) -> list[str]:
    """Write the model with checkpoint `step`'s adapter merged in; returns the base model
    directory's tokenizer files copied beside it (none: the base had no tokenizer)."""
    _new_dir(out_dir)
    spec, model, _ = _trained(rundir, step)
    if model.active_peft_config.is_prompt_learning:
        raise UserError(
            f"--merge: peft method {spec.peft.get('method', 'lora')!r} learns virtual tokens, not "
            "weight updates, so nothing merges into the base; export the adapter without --merge"
        )
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turned it off; the export is for generating
    merged.save_pretrained(out_dir)  # safetensors
    base_dir = staged.local_dir(rundir, BASE_MODEL)
    # Copied, not loaded and saved: the user's tokenizer, byte for byte, even one this
    # environment could not load (a sentencepiece model without sentencepiece installed).
    names = sorted(n for n in os.listdir(base_dir) if _is_tokenizer_file(n))
    for name in names:
        shutil.copyfile(os.path.join(base_dir, name), os.path.join(out_dir, name))
    _readable_as_siblings(out_dir)
    return names


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith("tokenizer") or name in TOKENIZER_FILES or name.endswith(".tiktoken")


def best_step(rundir: RunDir) -> tuple[int, float]:
    """(step, eval loss) of the persisted checkpoint with the lowest eval loss in its manifest
    (ties: the earlier step); UserError when none has one."""
    from resilient.checkpoint.retention import best

    scores = CheckpointStore(rundir).scores()
    step = best(scores)
    if step is None:
        raise UserError(
            f"--best: no persisted checkpoint of {rundir.uri} has an eval loss; configure [eval] "
            "(eval.split or eval.path) so that training evaluates, or export one with --step N"
        )
    return step, scores[step]


def export_compressed(rundir: RunDir, step: int, out_dir: str, density: float) -> tuple[int, int]:
    from safetensors.torch import save_file

    _new_dir(out_dir)
    spec, model, init = _trained(rundir, step)
    dense = adapter_tensors(model)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # peft's config, and the dense size to compare
        write_adapter(model, tmp, base_ref(rundir, spec.model.path))
        shutil.copy(os.path.join(tmp, CONFIG), os.path.join(out_dir, CONFIG))
        dense_bytes = os.path.getsize(os.path.join(tmp, ADAPTER))
    save_file(compeft.compress(dense, init, density), os.path.join(out_dir, PACKED))
    meta = {
        "format": FORMAT,
        "density": density,
        "step": step,
        # What rebuilds the initial state the update is relative to, and its hash to check it.
        "peft": spec.peft,
        "seed": spec.train.seed,
        "dtype": spec.model.dtype,
        "init_sha256": compeft.digest(init),
        "dense_bytes": dense_bytes,
        # Where the base was: what `ckpt expand` names when the config's path does not resolve.
        "run_base_model": rundir.url(BASE_MODEL) if not spec.model.path else spec.model.path,
    }
    with open(os.path.join(out_dir, PACKED_META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    _readable_as_siblings(out_dir)
    return dense_bytes, os.path.getsize(os.path.join(out_dir, PACKED))


def expand_dir(in_dir: str, out_dir: str, base: str | None = None) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    meta, cfg = _read_json(in_dir, PACKED_META), _read_json(in_dir, CONFIG)
    missing = {"format", "peft", "seed", "dtype", "init_sha256"} - set(meta)
    if meta.get("format") != FORMAT or missing:
        raise UserError(
            f"{in_dir}/{PACKED_META} is not a {FORMAT} description (format "
            f"{meta.get('format')!r}, missing {sorted(missing)}); export it again"
        )
    _new_dir(out_dir)
    base_dir = _base_dir(in_dir, cfg, meta, base)
    try:
        model = apply_adapter(load_base(base_dir, meta["dtype"]), meta["peft"], meta["seed"])
        init = adapter_tensors(model)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"base model {base_dir} does not take this adapter ({e}); pass --base "
            "with the run's base model"
        ) from None
    if compeft.digest(init) != meta["init_sha256"]:
        raise UserError(
            f"base model {base_dir} gives another initial adapter than the run's (init_sha256 "
            "differs: another base, or another peft version); pass --base with the run's base"
        )
    try:
        dense = compeft.expand(load_file(os.path.join(in_dir, PACKED)), init)
    except (OSError, ValueError, KeyError, SafetensorError) as e:
        raise UserError(f"{in_dir}/{PACKED} cannot be read ({e}); export it again") from None
    os.makedirs(out_dir, exist_ok=True)
    save_file(dense, os.path.join(out_dir, ADAPTER), metadata={"format": "pt"})
    cfg["base_model_name_or_path"] = os.path.abspath(base_dir)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    _readable_as_siblings(out_dir)


def _base_dir(in_dir: str, cfg: dict, meta: dict, base: str | None) -> str:
    """The local base model directory: `base`, else the adapter config's (relative to `in_dir`)."""
    ref = base or cfg.get("base_model_name_or_path", "")
    base_dir = ref if base or os.path.isabs(ref) or "://" in ref else os.path.join(in_dir, ref)
    if os.path.isfile(os.path.join(base_dir, "config.json")):
        return base_dir
    named = "--base" if base else "adapter_config.json's base_model_name_or_path"
    run = meta.get("run_base_model")
    raise UserError(
        f"base model {ref!r} ({named}) is not a local model directory (no config.json); pass "
        "--base DIR with a local copy of the run's base model"
        + (f" ({run})" if run and run != ref else "")
    )


def _new_dir(out_dir: str) -> None:
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"OUT {out_dir} exists and is not an empty directory; name a new one")


def _trained(rundir: RunDir, step: int):
    """The run's spec, its model with checkpoint `step`'s adapter, and the adapter's initial
    tensors."""
    spec = validate_tree(rundir.read_json(SPEC_FILE))
    snap = Snapshot.from_files(CheckpointStore(rundir).load(step, spec.fingerprint()))
    base = load_base(staged.local_dir(rundir, BASE_MODEL), spec.model.dtype)
    model = apply_adapter(base, spec.peft, spec.train.seed)
    init = adapter_tensors(model)
    load_trainable(model, snap.shared)
    return spec, model, init


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{path} is missing: IN must be a `ckpt export --compress` output"
        ) from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None
