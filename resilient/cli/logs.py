"""`resilient logs RUN_DIR [--rank N] [--follow]`: what the ranks wrote (logging, warnings,
tracebacks, NCCL), as collected into the run directory."""

from __future__ import annotations

import time

import click

from resilient.cli.base import cli, open_rundir, user_errors
from resilient.errors import UserError
from resilient.runlog.states import TERMINAL

POLL_S = 1.0


@cli.command()
@click.argument("run_dir")
@click.option("--rank", type=int, help="Only this rank's log (default: every rank's, prefixed).")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
@user_errors
def logs(run_dir, rank, follow) -> None:
    """Print the ranks' logs of a run (running or finished)."""
    from resilient.runlog import fold, read_records
    from resilient.runlog.ranklogs import FLUSH_S, LogReader, ranks

    rd = open_rundir(run_dir)
    found = ranks(rd)
    if rank is not None and rank not in found and not follow:
        have = ", ".join(map(str, found)) or "none yet"
        raise UserError(f"--rank {rank}: run {rd.uri} has no log of that rank (ranks: {have})")
    readers = {r: LogReader(rd, r) for r in ([rank] if rank is not None else found)}
    ended = not follow
    while True:
        for r, reader in sorted(readers.items()):
            for line in reader.new_lines():
                click.echo(line if rank is not None else f"[rank {r}] {line}")
        if ended:
            return
        # The driver writes the last lines after the final state: one more read once it is there.
        ended = fold(read_records(rd))["state"] in TERMINAL
        time.sleep(POLL_S if not ended else FLUSH_S + POLL_S)
        if rank is None:
            for r in ranks(rd):
                readers.setdefault(r, LogReader(rd, r))
