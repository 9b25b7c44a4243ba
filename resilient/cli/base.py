"""The `resilient` command group and what every command shares: one message and exit code 2 for
every user mistake (never a traceback), and opening a RUN_DIR."""

from __future__ import annotations

import functools
import os
import sys

import click

from resilient.errors import UserError


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def set_option(help: str = "Override a spec key, as `resilient launch --set` does."):
    """The `--set KEY=VALUE` option (repeatable) of every command that reads a spec."""
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help)


def _unreadable(uri: str, e: Exception) -> UserError:
    return UserError(
        f"RUN_DIR {uri!r} cannot be read ({type(e).__name__}: {e}); give a run directory path or "
        "fsspec URI (credentials through fsspec's config, e.g. FSSPEC_S3)"
    )


def open_rundir(uri: str):
    from resilient.rundir import RunDir
    from resilient.runlog.journal import journal_exists

    try:
        rd = RunDir(uri)
    except Exception as e:
        raise _unreadable(uri, e) from None
    if rd.is_local and not os.path.isdir(rd.local_path()):
        there = os.path.exists(rd.local_path())
        raise UserError(
            f"RUN_DIR {uri!r} {'is a file, not a run directory' if there else 'does not exist'}; "
            "give the run directory printed by `resilient launch` "
            "(<checkpoint.storage>/<name>/<run id>)"
        )
    try:
        found = journal_exists(rd)
    except Exception as e:
        raise _unreadable(uri, e) from None
    if not found:
        raise UserError(
            f"RUN_DIR {uri!r} holds no journal; give the run directory printed by `resilient "
            "launch`"
        )
    return rd


@click.group()
@click.version_option(package_name="resilient")
def cli() -> None:
    """Fault-tolerant LoRA fine-tuning on Ray."""
