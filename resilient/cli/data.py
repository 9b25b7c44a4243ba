"""`resilient data inspect SPEC`: check masking, templates and packing before spending GPU hours."""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.text import Text

from resilient.cli.base import cli, set_option, user_errors


@cli.group()
def data() -> None:
    """Look at a job's data as its ranks will see it."""


@data.command("inspect")
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--n",
    "n",
    type=click.IntRange(1, 10_000),
    default=4,
    show_default=True,
    help="Sequences to show, in the order training takes them.",
)
@click.option("--json", "as_json", is_flag=True, help="A JSON list of the sequences.")
@set_option()
@user_errors
def inspect(spec, n, as_json, overrides) -> None:
    """Prepare SPEC's data as `launch` would (nothing is written) and show its first sequences:
    what carries loss, where samples are packed together, what was left out."""
    from resilient.config import load_spec
    from resilient.launcher.preview import preview
    from resilient.training.prep import summary

    stats, seqs = preview(load_spec(spec, list(overrides)), n)
    if as_json:
        click.echo(json.dumps(seqs, indent=1))
        return
    console = Console()
    console.print(summary(stats), highlight=False, soft_wrap=True)
    for s in seqs:
        console.print(
            f"\n[bold]sequence {s['sequence']}[/] (step {s['step']}, microbatch "
            f"{s['microbatch']}): {s['tokens']} tokens, {s['trained_tokens']} with loss, "
            f"{s['samples']} sample{'s' if s['samples'] > 1 else ''}",
            highlight=False,
        )
        console.print(render(s["parts"]), soft_wrap=True)
    console.print(
        "\n[green]green[/]: carries loss; [dim]dim[/]: context only; "
        "[red]║[/]: a new sample (no attention across it)",
        highlight=False,
    )


def render(parts: list[list[dict]]) -> Text:
    out = Text()
    for k, runs in enumerate(parts):
        if k:
            out.append("║", style="bold red")
        for r in runs:
            out.append(r["text"], style="green" if r["trained"] else "dim")
    return out
