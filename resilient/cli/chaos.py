"""`resilient chaos inject`: hit a running job from another terminal."""

from __future__ import annotations

import time

import click

from resilient.catalogue import FAULTS
from resilient.cli.base import cli, open_rundir, user_errors
from resilient.errors import UserError
from resilient.runlog.states import TERMINAL


@cli.group()
def chaos() -> None:
    """Break a running job on purpose."""


@chaos.command("inject")
@click.argument("run_dir")
@click.option(
    "--fault",
    required=True,
    help="A fault of the catalogue (README), e.g. kill, hang, slow, gpu_xid.",
)
@click.option("--rank", type=int, help="The rank hit (rank faults).")
@click.option("--node", type=int, help="The node hit, by index (GPU faults).")
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="factor=2, xid=79, count=1, temperature=95, seconds=5",
)
@click.option(
    "--timeout",
    default=30.0,
    show_default=True,
    help="Seconds to wait for the job to carry it out.",
)
@user_errors
def chaos_inject(run_dir, fault, rank, node, params, timeout) -> None:
    """Hit a running job from another terminal; waits until its supervisor has carried the fault
    out."""
    from resilient.config import parse_value
    from resilient.rundir.control import cancel_inject, write_inject
    from resilient.rundir.layout import SPEC_FILE
    from resilient.runlog.journal import JournalReader
    from resilient.runlog.snapshot import read_status

    if fault not in FAULTS:
        raise UserError(f"--fault {fault!r} is not in the catalogue: {', '.join(FAULTS)}")
    kw = {}
    for p in params:
        k, sep, v = p.partition("=")
        if not sep:
            raise UserError(f"--param {p!r}: expected KEY=VALUE, e.g. --param factor=2")
        kw[k] = parse_value(v)
    rd = open_rundir(run_dir)
    if read_status(rd)["state"] in TERMINAL:
        raise UserError(f"{run_dir} is not running")
    chaos = rd.read_json(SPEC_FILE).get("chaos")
    if not (isinstance(chaos, dict) and chaos.get("allow_inject")):
        raise UserError(
            f"{run_dir} was launched without --allow-chaos: it refuses injected faults. Relaunch "
            "(or `resilient launch --resume RUN_DIR --allow-chaos`) to allow them"
        )
    req = write_inject(rd, fault, rank, node, kw)
    deadline = time.time() + timeout
    journal = JournalReader(rd)  # each poll reads only the bytes that are new (a local journal)
    while time.time() < deadline:
        for r in journal.read():
            if r.get("request") == req:
                if r["type"] == "chaos_refused":
                    raise UserError(f"the job refused {fault}: {r['error']}")
                at = (
                    f"rank {r['rank']}"
                    if r.get("rank") is not None
                    else (f"node {r['node']}" if r.get("node") else "the job")
                )
                click.echo(f"injected {fault} at step {r.get('step')} ({at})")
                return
        time.sleep(0.3)
    cancel_inject(rd, req)
    raise UserError(
        f"the job did not pick the request up within {timeout}s; is its `resilient launch` running?"
    )
