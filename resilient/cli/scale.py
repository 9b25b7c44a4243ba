"""`resilient scale RUN_DIR --workers N`: ask a running job to go on with N ranks."""

from __future__ import annotations

import click

from resilient.cli.base import cli, open_rundir, user_errors
from resilient.errors import UserError
from resilient.runlog.states import TERMINAL


@cli.command()
@click.argument("run_dir")
@click.option(
    "--workers",
    type=int,
    required=True,
    help="Ranks to go on with, between cluster.min_workers and cluster.num_workers.",
)
@user_errors
def scale(run_dir, workers) -> None:
    """Resize a running job at its next step: fewer ranks at once, more as soon as the cluster
    holds them (the global batch stays the same). The request stays for later lives of the run."""
    from resilient.rundir.control import request_scale
    from resilient.rundir.layout import SPEC_FILE
    from resilient.runlog.snapshot import read_status

    rd = open_rundir(run_dir)
    cluster = rd.read_json(SPEC_FILE).get("cluster", {})
    most = cluster.get("num_workers", 1)
    least = cluster.get("min_workers") or most
    if not least <= workers <= most:
        raise UserError(
            f"--workers {workers} is outside this job's {least}..{most} "
            "(cluster.min_workers..cluster.num_workers); relaunch with another "
            "cluster.min_workers to go lower"
        )
    s = read_status(rd)
    if s["state"] in TERMINAL:
        raise UserError(f"the run already ended {s['state']}; nothing to resize")
    request_scale(rd, workers)
    now = f" (it runs {s['world_size']} now)" if s.get("world_size") else ""
    click.echo(f"asked for {workers} rank(s){now}; the job resizes at its next step")
