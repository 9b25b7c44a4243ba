"""Export any verified checkpoint of a run as a peft adapter directory, dense or ComPEFT-packed.

Contract: `export_step(rundir, step, out_dir)` rebuilds the run's model with its adapter from
`spec.json`, loads the checkpoint's adapter tensors (checksums verified, safetensors only) and
saves a directory `PeftModel.from_pretrained` loads, naming the run's base model. It raises
`CheckpointInvalid` when the checkpoint is missing or damaged. `export_compressed(..., density)`
writes the same adapter as a ComPEFT update of its initial state instead (`compeft.safetensors`,
`compeft.json`, peft's `adapter_config.json`) and returns (dense bytes, packed bytes);
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
from resilient.training.model import adapter_tensors, apply_adapter, load_base, load_trainable
from resilient.training.trainer import write_adapter

ADAPTER, CONFIG = "adapter_model.safetensors", "adapter_config.json"
PACKED, PACKED_META, FORMAT = "compeft.safetensors", "compeft.json", "resilient-compeft/1"


def export_step(rundir: RunDir, step: int, out_dir: str) -> None:
    model, _ = _trained(rundir, step)
    write_adapter(model, out_dir, base_ref(rundir, _spec(rundir).model.path))


def export_compressed(rundir: RunDir, step: int, out_dir: str, density: float) -> tuple[int, int]:
    from safetensors.torch import save_file

    spec = _spec(rundir)
    model, init = _trained(rundir, step)
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
    }
    with open(os.path.join(out_dir, PACKED_META), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    return dense_bytes, os.path.getsize(os.path.join(out_dir, PACKED))


def expand_dir(in_dir: str, out_dir: str, base: str | None = None) -> None:
    from safetensors.torch import load_file, save_file

    meta, cfg = _read_json(in_dir, PACKED_META), _read_json(in_dir, CONFIG)
    if meta.get("format") != FORMAT:
        raise UserError(f"{in_dir}/{PACKED_META}: format {meta.get('format')!r}, not {FORMAT!r}")
    ref = base or cfg.get("base_model_name_or_path", "")
    base_dir = ref if base or os.path.isabs(ref) else os.path.join(in_dir, ref)
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        named = "--base" if base else "adapter_config.json's base_model_name_or_path"
        raise UserError(
            f"base model {ref!r} ({named}) is not a local model directory (no config.json); "
            "pass --base DIR with the run's base model"
        )
    model = apply_adapter(load_base(base_dir, meta["dtype"]), meta["peft"], meta["seed"])
    init = adapter_tensors(model)
    if compeft.digest(init) != meta["init_sha256"]:
        raise UserError(
            f"base model {base_dir} gives another initial adapter than the run's (init_sha256 "
            "differs: another base, or another peft version); pass --base with the run's base"
        )
    dense = compeft.expand(load_file(os.path.join(in_dir, PACKED)), init)
    os.makedirs(out_dir, exist_ok=True)
    save_file(dense, os.path.join(out_dir, ADAPTER), metadata={"format": "pt"})
    cfg["base_model_name_or_path"] = os.path.abspath(base_dir)
    with open(os.path.join(out_dir, CONFIG), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def _spec(rundir: RunDir):
    return validate_tree(rundir.read_json(SPEC_FILE))


def _trained(rundir: RunDir, step: int):
    """The run's model with checkpoint `step`'s adapter, and the adapter's initial tensors."""
    spec = _spec(rundir)
    snap = Snapshot.from_files(CheckpointStore(rundir).load(step, spec.fingerprint()))
    base = load_base(staged.local_dir(rundir, BASE_MODEL), spec.model.dtype)
    model = apply_adapter(base, spec.peft, spec.train.seed)
    init = adapter_tensors(model)
    load_trainable(model, snap.shared)
    return model, init


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
