"""The `resilient` command: launch, status, stop, scale, logs, dashboard, chaos inject, ckpt,
data inspect.

Every user mistake ends in one message on stderr naming the field or argument and the fix, and exit
code 2 (no traceback). A job that ends SUCCEEDED or STOPPED exits 0, FAILED exits 1 (so does one
whose final state storage does not hold yet), one stopped by SIGTERM or SIGINT 143 or 130.
"""

from resilient.cli import chaos, ckpt, data, logs, preflight, run, scale  # noqa: F401 (each registers its commands)
from resilient.cli.base import cli


def main() -> None:
    cli()
