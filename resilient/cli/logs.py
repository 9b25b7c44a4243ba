"""`resilient logs RUN_DIR [--rank N | --driver] [--follow]`: what the ranks wrote (logging,
warnings, tracebacks, NCCL), and what Ray printed in the launching process (worker-death notices,
C++ warnings: kept off the launch's terminal), as collected into the run directory."""

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
@click.option(
    "--driver", is_flag=True, help="Only what Ray printed in the launching process (its notices)."
)
@click.option("--follow", "-f", is_flag=True, help="Keep printing new lines until the run ends.")
@user_errors
def logs(run_dir, rank, driver, follow) -> None:
    """Print the ranks' logs of a run (running or finished)."""
    from resilient.rundir.layout import DRIVER_LOG
    from resilient.runlog.ranklogs import FLUSH_S, LogReader, has_driver_log, ranks
    from resilient.runlog.snapshot import read_status

    rd = open_rundir(run_dir)
    found = ranks(rd)
    if rank is not None and rank not in found and not follow:
        have = ", ".join(map(str, found)) or "none yet"
        raise UserError(f"--rank {rank}: run {rd.uri} has no log of that rank (ranks: {have})")
    only = DRIVER_LOG if driver else rank
    keys = [only] if only is not None else found + ([DRIVER_LOG] if has_driver_log(rd) else [])
    readers = {k: LogReader(rd, k) for k in keys}
    ended = not follow
    while True:
        for k, reader in sorted(
            readers.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(9))
        ):
            for line in reader.new_lines():
                click.echo(line if only is not None else f"[{_label(k)}] {line}")
        if ended:
            return
        # The driver writes the last lines after the final state: one more read once it is there.
        ended = read_status(rd)["state"] in TERMINAL
        time.sleep(POLL_S if not ended else FLUSH_S + POLL_S)
        if only is None:
            for r in ranks(rd):
                readers.setdefault(r, LogReader(rd, r))
            if has_driver_log(rd):
                readers.setdefault(DRIVER_LOG, LogReader(rd, DRIVER_LOG))


def _label(key: int | str) -> str:
    return f"rank {key}" if isinstance(key, int) else key
