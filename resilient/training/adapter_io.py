"""Writing a peft adapter directory.

Contract: `write_adapter(peft_model, out_dir, base_ref)` saves the adapter in peft's format with
`base_ref` as its adapter_config's base_model_name_or_path; `export_to(rundir, trainer, rel,
base_ref)` does that into `rel` of a (possibly remote) run directory, through a local temporary
directory.
"""

from __future__ import annotations

import json
import os
import tempfile


def write_adapter(peft_model, out_dir: str, base_ref: str) -> None:
    """Save the adapter in peft's format; `base_ref` goes into adapter_config's
    base_model_name_or_path."""
    peft_model.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base_ref
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def export_to(rundir, trainer, rel: str, base_ref: str) -> None:
    """Export the adapter into `rel` of a (possibly remote) run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(trainer.model, tmp, base_ref)
        rundir.upload_dir(tmp, rel)
