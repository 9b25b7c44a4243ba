"""`resilient preflight SPEC`: the checks a launch runs on every node before training, alone."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from resilient.cli.base import cli, set_option, user_errors

PLACE_S = 30.0  # how long the check waits for room for the job's slots


@cli.command()
@click.argument("spec", type=click.Path(exists=True, dir_okay=False))
@set_option()
@click.option("--json", "as_json", is_flag=True, help="One JSON record per node.")
@user_errors
def preflight(spec, overrides, as_json) -> None:
    """Check every node of SPEC's cluster as a launch does before the first step: a computation
    with a known result on each device, an all-reduce among the nodes (timed), a write and read
    of checkpoint.storage, free memory and disk. One row per node; exit 1 if a node fails.
    A `bad_compute` entry planned for step 1 (`--set chaos=[...]`) is in place first."""
    from resilient.agents.preflight import run_preflight
    from resilient.chaos.controller import preflight_targets
    from resilient.config import load_spec
    from resilient.launcher.cluster import connect
    from resilient.launcher.terminal import Terminal
    from resilient.supervisor.nodes import Nodes

    job = load_spec(spec, list(overrides))
    with Terminal() as term:
        conn = connect(job.cluster)
        uri = f"{job.checkpoint.storage.rstrip('/')}/{job.name}"
        nodes = Nodes(job, uri)
        try:
            # the job's slots reserved as a launch reserves them, so the nodes are numbered as
            # the launch numbers them (chaos `node = i`, the rank a `bad_compute` names); where
            # the job does not fit now, every node is still checked, in Ray's order
            nodes.number_as_launch(PLACE_S)
            every = nodes.every_node()
            bad = {nid for _, nid in preflight_targets(job.chaos.plan, nodes)}
            results = run_preflight(every, uri, job.checkpoint.storage_options, bad)
        finally:
            nodes.shutdown()
            conn.close()
        wide = None if term.out.isatty() else 160  # a log keeps whole rows
        out = Console(file=term.out, width=wide)
        if as_json:
            out.print_json(json.dumps(results))
        else:
            out.print(table(results))
            failed = [r for r in results if not r["ok"]]
            seconds = max((r["seconds"] for r in results), default=0.0)
            out.print(
                f"{len(results)} node(s) checked in {seconds:.1f}s: "
                + (f"{len(failed)} failed" if failed else "all passed"),
                highlight=False,
            )
    if any(not r["ok"] for r in results):
        sys.exit(1)


def table(results: list[dict]) -> Table:
    t = Table(title="preflight")
    for col in ("node", "id", "ip", "result", "compute", "all-reduce", "storage", "mem free",
                "disk free", "why"):  # fmt: skip
        t.add_column(col)
    for r in results:
        t.add_row(
            str(r["index"]),
            r["node"][:12],
            str(r.get("ip") or "?"),
            "[green]ok[/]" if r["ok"] else "[red]FAIL[/]",
            _secs(r, "compute"),
            _secs(r, "allreduce"),
            _secs(r, "storage"),
            f"{r['mem_free_gb']:.1f} GiB" if "mem_free_gb" in r else "?",
            f"{r['disk_free_gb']:.1f} GiB" if "disk_free_gb" in r else "?",
            "; ".join([*r["reasons"], *(f"[yellow]{w}[/]" for w in r.get("warnings", ()))]),
        )
    return t


def _secs(r: dict, what: str) -> str:
    ok = r.get(f"{what}_ok")
    if ok is None:
        return "?"
    return f"{r.get(f'{what}_s', 0.0) * 1000:.0f} ms" + ("" if ok else " [red]bad[/]")
