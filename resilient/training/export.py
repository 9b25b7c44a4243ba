"""Export any verified checkpoint of a run as a peft adapter directory.

Contract: `export_step(rundir, step, out_dir)` rebuilds the run's model with its adapter from
`spec.json`, loads the checkpoint's adapter tensors (checksums verified, safetensors only) and
saves a directory `PeftModel.from_pretrained` loads, naming the run's base model. It raises
`CheckpointInvalid` when the checkpoint is missing or damaged.
"""

from __future__ import annotations

from resilient.checkpoint.snapshot import Snapshot
from resilient.checkpoint.storage import CheckpointStore
from resilient.config import validate_tree
from resilient.rundir import RunDir, staged
from resilient.rundir.layout import BASE_MODEL, SPEC_FILE, base_ref
from resilient.training.model import apply_adapter, load_base, load_trainable
from resilient.training.trainer import write_adapter


def export_step(rundir: RunDir, step: int, out_dir: str) -> None:
    spec = validate_tree(rundir.read_json(SPEC_FILE))
    snap = Snapshot.from_files(CheckpointStore(rundir).load(step, spec.fingerprint()))
    model = apply_adapter(
        load_base(staged.local_dir(rundir, BASE_MODEL), spec.model.dtype),
        spec.peft,
        spec.train.seed,
    )
    load_trainable(model, snap.shared)
    write_adapter(model, out_dir, base_ref(rundir, spec.model.path))
