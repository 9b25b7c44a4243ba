"""`resilient launch`, `status`, `stop` and `dashboard`."""

from __future__ import annotations

import json
import sys
import time

import click

from resilient.catalogue import RANDOM, RANDOM_DEFAULT
from resilient.cli.base import cli, open_rundir, set_option, user_errors
from resilient.errors import Abort, UserError
from resilient.runlog.states import TERMINAL


@cli.command()
@click.argument("spec", required=False)
@set_option("Override a spec key, e.g. train.steps=40.")
@click.option(
    "--run-id", help="Name of the run directory below <storage>/<name>/ (default: a timestamp)."
)
@click.option(
    "--chaos-mtbf",
    metavar="DURATION",
    help="Random chaos: faults at random times, mean time between them (60s, 5m).",
)
@click.option(
    "--chaos-faults",
    default=",".join(RANDOM_DEFAULT),
    show_default=True,
    help="Random chaos: the kinds drawn from.",
)
@click.option(
    "--chaos-seed",
    default=0,
    show_default=True,
    type=int,
    help="Random chaos: the same seed, the same schedule.",
)
@click.option(
    "--allow-chaos",
    is_flag=True,
    help="Let `resilient chaos inject` reach this job (chaos.allow_inject = true).",
)
@click.option(
    "--dashboard",
    "with_dashboard",
    is_flag=True,
    help="Serve the dashboard beside the job (127.0.0.1).",
)
@click.option(
    "--dashboard-port",
    type=int,
    help="Default: 8266 or the next free port (Ray's dashboard has 8265).",
)
@click.option(
    "--resume",
    "resume_dir",
    metavar="RUN_DIR",
    help="Continue a run from its journal and newest persisted checkpoint (--set may change e.g. "
    "train.steps).",
)
@user_errors
def launch(
    spec,
    overrides,
    run_id,
    chaos_mtbf,
    chaos_faults,
    chaos_seed,
    allow_chaos,
    with_dashboard,
    dashboard_port,
    resume_dir,
) -> None:
    """Run the job described by SPEC (TOML or YAML)."""
    from rich.console import Console

    from resilient import heap
    from resilient.config import load_spec
    from resilient.launcher import launch as do_launch
    from resilient.launcher import resume as do_resume
    from resilient.launcher.patience import StorageUnavailable
    from resilient.launcher.terminal import Terminal

    heap.limit_arenas()  # before Ray's threads: the driver lives for weeks

    dash = None
    if with_dashboard or dashboard_port:
        from resilient.dashboard.app import pick_port

        dash = pick_port("127.0.0.1", dashboard_port)
    extra = list(overrides)
    if chaos_mtbf:
        extra.append(random_chaos(chaos_mtbf, chaos_faults, chaos_seed))
    if allow_chaos:
        extra.append("chaos.allow_inject=true")
    if not resume_dir and not spec:
        raise UserError("SPEC is missing: `resilient launch job.toml` (or --resume RUN_DIR)")
    job = None if resume_dir else load_spec(spec, extra)
    try:
        # the terminal is the job's: what Ray and other libraries print goes to the run's logs
        with Terminal() as term:
            console, lines = Console(file=term.out), term.lines
            if resume_dir:
                status = do_resume(resume_dir, console, extra, dash, lines)
            else:
                status = do_launch(job, run_id, console, dash, lines)
    except Abort as e:  # a second signal outside the supervisor: the journal is consistent
        click.echo(f"stopped: {e.reason}", err=True)
        sys.exit(128 + (e.signum or 15))
    except StorageUnavailable as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    sys.exit(exit_code(status))


def exit_code(status: dict) -> int:
    """0: SUCCEEDED or STOPPED; 1: FAILED, or a final state storage does not hold yet; 128 + N:
    stopped by signal N (143 for SIGTERM, 130 for SIGINT)."""
    if status.get("signal"):
        return 128 + status["signal"]
    if status["state"] == "FAILED" or status.get("journal_durable") is False:
        return 1
    return 0


def random_chaos(mtbf: str, faults: str, seed: int) -> str:
    """The `--set` that records random chaos in the spec (a seed and parameters, drawn as the job
    trains; spec.json keeps it, so --resume keeps it)."""
    from resilient.chaos.schedule import parse_duration

    kinds = [k.strip() for k in faults.split(",") if k.strip()]
    if not kinds or any(k not in RANDOM for k in kinds):
        raise UserError(
            f"--chaos-faults {faults!r}: random chaos draws rank faults; choose from "
            + ", ".join(RANDOM)
        )
    return f"chaos.random={{mtbf_s = {parse_duration(mtbf)}, faults = {kinds!r}, seed = {seed}}}"


@cli.command()
@click.argument("run_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@user_errors
def status(run_dir, as_json) -> None:
    """State, progress, restarts and faults of a run (running or finished), from its journal."""
    from resilient.runlog.snapshot import read_status

    s = read_status(open_rundir(run_dir))
    if as_json:
        click.echo(json.dumps(s, indent=1, default=str))
        return
    click.echo(
        f"{s['state']}  step {s['step']}/{s['total_steps']}  restarts {s['restarts']}  "
        f"checkpoints {s['checkpoints']} (last step {s['last_checkpoint']})"
    )
    for f in s["faults"]:
        rec = (
            f"recovered in {f['recovery_s']:.2f}s"
            if f.get("recovery_s") is not None
            else "not recovered"
        )
        click.echo(f"  fault {f['kind']} rank {f['rank']} step {f['step']}: {rec}")
    if s.get("world_size") is not None:
        click.echo(f"  ranks {s['world_size']}")
    for r in s.get("resizes", []):
        click.echo(f"  resized {r['from']} -> {r['to']} at step {r['step']}: {r['reason']}")
    if s.get("reason"):
        click.echo(f"  {s['reason']}")


@cli.command()
@click.argument("run_dir")
@click.option("--wait/--no-wait", default=True, help="Wait until the job has stopped (default).")
@click.option("--timeout", default=300.0, help="Seconds to wait.")
@user_errors
def stop(run_dir, wait, timeout) -> None:
    """Stop a running job cleanly: the ranks agree on a step, persist it, and the job ends
    STOPPED."""
    from resilient.rundir.control import request_stop
    from resilient.runlog.snapshot import read_status

    rd = open_rundir(run_dir)
    s = read_status(rd)
    if s["state"] in TERMINAL:
        click.echo(f"run already ended {s['state']}")
        return
    request_stop(rd)
    click.echo("stop requested")
    deadline = time.time() + timeout
    while wait and time.time() < deadline:
        s = read_status(rd)
        if s["state"] in TERMINAL:
            click.echo(f"{s['state']} at step {s['step']}")
            return
        time.sleep(0.5)
    if wait:
        raise UserError(
            f"the job did not stop within --timeout {timeout}s; is its `resilient launch` still "
            "running?"
        )


@cli.command()
@click.argument("run_dirs", metavar="RUN_DIR [RUN_DIR ...]", nargs=-1, required=True)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; another than loopback needs --token.",
)
@click.option(
    "--port", type=int, help="Default: 8266 or the next free port (Ray's dashboard has 8265)."
)
@click.option(
    "--token",
    envvar="RESILIENT_DASHBOARD_TOKEN",
    help="Every request must carry it (env RESILIENT_DASHBOARD_TOKEN).",
)
@click.option(
    "--allow-host",
    "allow_hosts",
    multiple=True,
    metavar="NAME",
    help="A Host header name to answer besides the bound address (a proxy's, a tunnel's); "
    "repeatable. Any other is refused (a defence against DNS rebinding).",
)
@user_errors
def dashboard(run_dirs, host, port, token, allow_hosts) -> None:
    """Serve the live dashboard of a run (running or finished); given several, it overlays them
    (a clean run beside a chaos run: loss by step and lost time side by side)."""
    from resilient.dashboard.app import check_bind, pick_port, serve, url

    check_bind(host, token)
    rds = [open_rundir(r) for r in run_dirs]
    port = pick_port(host, port)
    which = rds[0].uri if len(rds) == 1 else f"{len(rds)} runs"
    click.echo(f"dashboard of {which}: {url(host, port, token)}  (Ctrl-C to stop)")
    serve(rds, host, port, token, allow_hosts=tuple(allow_hosts))
