"""`resilient ckpt list|verify|export|expand`: a run's persisted checkpoints (with their eval
loss), and exports of one (by step, or the best by eval loss): a peft adapter (dense, or
ComPEFT-packed and expanded back) or the model with the adapter merged in."""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.table import Table

from resilient.cli.base import cli, open_rundir, user_errors
from resilient.errors import UserError


@cli.group()
def ckpt() -> None:
    """List, verify and export a run's checkpoints; expand a ComPEFT export."""


@ckpt.command("list")
@click.argument("run_dir")
@user_errors
def ckpt_list(run_dir) -> None:
    """Persisted checkpoints: step, tier, size, persisted at, eval loss, replicas (whether the
    ranks' digests agreed on it, and whether it passed a compute audit), verified."""
    from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore, eval_loss

    store = CheckpointStore(open_rundir(run_dir))
    console = Console()

    t = Table("step", "tier", "size", "persisted at", "eval loss", "replicas", "verified")
    for step in store.steps():
        try:
            m = store.manifest(step)
            store.verify(step)
            ok = "yes"
        except CheckpointInvalid as e:
            m, ok = None, f"NO: {e}"
        size = f"{sum(f['size'] for f in m['files'].values()) / 1024:.1f} KiB" if m else "-"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["persisted_at"])) if m else "-"
        loss = eval_loss(m) if m else None
        t.add_row(
            str(step),
            "storage",
            size,
            when,
            "-" if loss is None else f"{loss:.4f}",
            replicas(m),
            ok,
        )
    console.print(t)


def replicas(manifest: dict | None) -> str:
    """What the manifest says of the ranks' agreement on the step: "agreed (N)", "agreed +
    audit (N)", or "-" (one rank, or a step persisted before digests were compared)."""
    i = (manifest or {}).get("integrity")
    if not i:
        return "-"
    return f"agreed{' + audit' if i.get('audited') else ''} ({i.get('ranks')})"


def _persisted(step: int, persisted: list[int], run_dir: str) -> None:
    """--step names a persisted checkpoint, else one message saying which there are."""
    if step not in persisted:
        raise UserError(
            f"--step {step}: {run_dir} has no persisted checkpoint of that step "
            f"(it has {persisted[-5:] or 'none'}); `resilient ckpt list RUN_DIR` shows them"
        )


@ckpt.command("verify")
@click.argument("run_dir")
@click.option("--step", type=int, help="Only this step (default: every persisted checkpoint).")
@user_errors
def ckpt_verify(run_dir, step) -> None:
    """Check sizes and checksums of persisted checkpoints; exit 1 if any is damaged."""
    from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore

    store = CheckpointStore(open_rundir(run_dir))
    persisted = store.steps()
    if step is not None:
        _persisted(step, persisted, run_dir)
    steps = [step] if step is not None else persisted
    if not steps:
        raise UserError(f"{run_dir} has no persisted checkpoints")
    bad = 0
    for s in steps:
        try:
            store.verify(s)
            click.echo(f"step {s}: ok")
        except CheckpointInvalid as e:
            bad += 1
            click.echo(f"step {s}: BAD ({e})")
    sys.exit(1 if bad else 0)


@ckpt.command("export")
@click.argument("run_dir")
@click.option("--step", type=int, help="The persisted checkpoint to export (or --best).")
@click.option(
    "--best",
    is_flag=True,
    help="Export the persisted checkpoint with the lowest eval loss (ties: the earlier step; "
    "the run must have evaluated: [eval]).",
)
@click.argument("out")
@click.option(
    "--merge",
    is_flag=True,
    help="Write the adapter merged into the base model: a model directory (safetensors) "
    "AutoModelForCausalLM.from_pretrained loads alone, with the base's tokenizer files where it "
    "has any. Not with --compress.",
)
@click.option(
    "--compress",
    type=click.Choice(["compeft"]),
    help="Write a ComPEFT adapter: the update since the initial adapter, sparse and ternary "
    "(`resilient ckpt expand` writes the dense adapter back).",
)
@click.option(
    "--density",
    type=click.FloatRange(0, 1, min_open=True),
    help="With --compress: the fraction of each tensor's update kept  [default: 0.1]",
)
@user_errors
def ckpt_export(run_dir, step, best, out, merge, compress, density) -> None:
    """Write checkpoint STEP (or --best: the lowest eval loss) as a peft adapter directory OUT,
    or (--merge) merged into the base model as a full model directory."""
    from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore
    from resilient.training.export import best_step, export_compressed, export_merged, export_step

    if step is not None and best:
        raise UserError("--step and --best both name a checkpoint: give only one of them")
    if step is None and not best:
        raise UserError("name the checkpoint to export: give --step N or --best")
    if density is not None and not compress:
        raise UserError("--density applies to a compressed export: add --compress compeft")
    if merge and compress:
        raise UserError("--merge writes a whole model, --compress an adapter update: drop one")
    density = 0.1 if density is None else density
    rd = open_rundir(run_dir)
    what = f"step {step}"
    if best:
        step, loss = best_step(rd)
        what = f"step {step} (the best: eval loss {loss:.4f})"
    else:
        _persisted(step, CheckpointStore(rd).steps(), run_dir)
    try:
        if merge:
            tokenizer = export_merged(rd, step, out)
            with_tok = (
                ", with the base's tokenizer" if tokenizer else " (the base has no tokenizer)"
            )
            click.echo(f"{what} merged into the base model, written to {out}{with_tok}")
            return
        if not compress:
            export_step(rd, step, out)
            click.echo(f"adapter of {what} written to {out}")
            return
        dense, packed = export_compressed(rd, step, out, density)
    except CheckpointInvalid as e:
        raise UserError(
            f"--step {step}: {e}; `resilient ckpt list {run_dir}` shows the checkpoints"
        ) from None
    click.echo(
        f"ComPEFT adapter of {what} (density {density:g}) written to {out}: {packed:,} "
        f"bytes, {dense / packed:.1f}x smaller than the dense adapter ({dense:,} bytes)"
    )


@ckpt.command("expand")
@click.argument("in_dir", metavar="IN")
@click.argument("out")
@click.option(
    "--base",
    type=click.Path(exists=True, file_okay=False),
    help="The run's base model directory, where the one adapter_config.json names has moved.",
)
@user_errors
def ckpt_expand(in_dir, out, base) -> None:
    """Write the dense peft adapter of a ComPEFT export IN to OUT."""
    from resilient.training.export import expand_dir

    expand_dir(in_dir, out, base)
    click.echo(f"dense adapter written to {out}")
