"""The `resilient` command: launch, status, stop, ckpt.

Every user mistake ends in one message on stderr naming the field or argument and the fix, and exit
code 2 (no traceback). A job that ends SUCCEEDED or STOPPED exits 0, FAILED exits 1.
"""

from __future__ import annotations

import functools
import json
import sys
import time

import click
from rich.console import Console

from resilient.catalogue import FAULTS, RANDOM, RANDOM_DEFAULT
from resilient.errors import UserError
from resilient.runlog.states import TERMINAL


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)

    return wrapper


def _rundir(uri: str):
    from resilient.rundir import RunDir
    from resilient.rundir.layout import JOURNAL

    try:
        rd = RunDir(uri)
        found = rd.exists(JOURNAL)
    except Exception as e:
        raise UserError(
            f"RUN_DIR {uri!r} cannot be read ({type(e).__name__}: {e}); give a run directory path "
            "or "
            "fsspec URI (credentials through fsspec's config, e.g. FSSPEC_S3)"
        ) from None
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


@cli.command()
@click.argument("spec", required=False)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a spec key, e.g. train.steps=40.",
)
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
    "--dashboard",
    "with_dashboard",
    is_flag=True,
    help="Serve the dashboard beside the job (127.0.0.1).",
)
@click.option("--dashboard-port", default=8265, show_default=True, type=int)
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
    with_dashboard,
    dashboard_port,
    resume_dir,
) -> None:
    """Run the job described by SPEC (TOML or YAML)."""
    from resilient.config import load_spec
    from resilient.launcher import launch as do_launch
    from resilient.launcher import resume as do_resume

    dash = dashboard_port if with_dashboard else None
    if resume_dir:
        status = do_resume(resume_dir, overrides=list(overrides), dashboard_port=dash)
    else:
        if not spec:
            raise UserError("SPEC is missing: `resilient launch job.toml` (or --resume RUN_DIR)")
        job = load_spec(spec, list(overrides))
        if chaos_mtbf:
            job = with_random_chaos(job, chaos_mtbf, chaos_faults, chaos_seed)
        status = do_launch(job, run_id, dashboard_port=dash)
    sys.exit(1 if status["state"] == "FAILED" else 0)


def with_random_chaos(job, mtbf: str, faults: str, seed: int):
    """The spec plus a seeded random schedule of faults (kept in the run's spec.json, so --resume
    keeps it)."""
    from resilient.chaos.schedule import parse_duration, random_schedule
    from resilient.config import validate_tree

    kinds = tuple(k.strip() for k in faults.split(",") if k.strip())
    if not kinds or any(k not in RANDOM for k in kinds):
        raise UserError(
            f"--chaos-faults {faults!r}: random chaos draws rank faults; choose from "
            + ", ".join(RANDOM)
        )
    tree = job.model_dump(mode="json")
    tree["chaos"] = tree["chaos"] + random_schedule(
        parse_duration(mtbf), kinds, seed, job.cluster.num_workers
    )
    return validate_tree(tree)


@cli.command()
@click.argument("run_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the status as one JSON object.")
@user_errors
def status(run_dir, as_json) -> None:
    """State, progress, restarts and faults of a run (running or finished), from its journal."""
    from resilient.runlog import fold, read_records

    s = fold(read_records(_rundir(run_dir)))
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
    from resilient.runlog import fold, read_records

    rd = _rundir(run_dir)
    s = fold(read_records(rd))
    if s["state"] in TERMINAL:
        click.echo(f"run already ended {s['state']}")
        return
    request_stop(rd)
    click.echo("stop requested")
    deadline = time.time() + timeout
    while wait and time.time() < deadline:
        s = fold(read_records(rd))
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
@click.argument("run_dir")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; another than loopback needs --token.",
)
@click.option("--port", default=8265, show_default=True, type=int)
@click.option(
    "--token",
    envvar="RESILIENT_DASHBOARD_TOKEN",
    help="Every request must carry it (env RESILIENT_DASHBOARD_TOKEN).",
)
@user_errors
def dashboard(run_dir, host, port, token) -> None:
    """Serve the live anomaly dashboard of a run (running or finished)."""
    from resilient.dashboard.app import check_bind, serve, url

    check_bind(host, token)
    rd = _rundir(run_dir)
    click.echo(f"dashboard of {rd.uri}: {url(host, port, token)}  (Ctrl-C to stop)")
    serve(rd, host, port, token)


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
    from resilient.runlog import fold, read_records

    if fault not in FAULTS:
        raise UserError(f"--fault {fault!r} is not in the catalogue: {', '.join(FAULTS)}")
    kw = {}
    for p in params:
        k, sep, v = p.partition("=")
        if not sep:
            raise UserError(f"--param {p!r}: expected KEY=VALUE, e.g. --param factor=2")
        kw[k] = parse_value(v)
    rd = _rundir(run_dir)
    if fold(read_records(rd))["state"] in TERMINAL:
        raise UserError(f"{run_dir} is not running")
    req = write_inject(rd, fault, rank, node, kw)
    deadline = time.time() + timeout
    while time.time() < deadline:
        for r in read_records(rd):
            if r.get("request") == req:
                if r["type"] == "chaos_refused":
                    raise UserError(f"the job refused {fault}: {r['error']}")
                click.echo(
                    f"injected {fault} at step {r.get('step')} "
                    f"({r.get('rank') if r.get('rank') is not None else r.get('node')})"
                )
                return
        time.sleep(0.3)
    cancel_inject(rd, req)
    raise UserError(
        f"the job did not pick the request up within {timeout}s; is its `resilient launch` running?"
    )


@cli.group()
def ckpt() -> None:
    """List, verify and export a run's checkpoints."""


@ckpt.command("list")
@click.argument("run_dir")
@user_errors
def ckpt_list(run_dir) -> None:
    """Persisted checkpoints: step, tier, size, persisted at, verified."""
    from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore

    store = CheckpointStore(_rundir(run_dir))
    console = Console()
    from rich.table import Table

    t = Table("step", "tier", "size", "persisted at", "verified")
    for step in store.steps():
        m = store.manifest(step)
        try:
            store.verify(step)
            ok = "yes"
        except CheckpointInvalid as e:
            ok = f"NO: {e}"
        size = sum(f["size"] for f in m["files"].values())
        t.add_row(
            str(step),
            "storage",
            f"{size / 1024:.1f} KiB",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["persisted_at"])),
            ok,
        )
    console.print(t)


@ckpt.command("verify")
@click.argument("run_dir")
@click.option("--step", type=int, help="Only this step (default: every persisted checkpoint).")
@user_errors
def ckpt_verify(run_dir, step) -> None:
    """Check sizes and checksums of persisted checkpoints; exit 1 if any is damaged."""
    from resilient.checkpoint.storage import CheckpointInvalid, CheckpointStore

    store = CheckpointStore(_rundir(run_dir))
    steps = [step] if step is not None else store.steps()
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
@click.option("--step", type=int, required=True, help="The persisted checkpoint to export.")
@click.argument("out")
@user_errors
def ckpt_export(run_dir, step, out) -> None:
    """Write checkpoint STEP as a peft adapter directory OUT."""
    from resilient.checkpoint.storage import CheckpointInvalid
    from resilient.training.export import export_step

    rd = _rundir(run_dir)
    try:
        export_step(rd, step, out)
    except CheckpointInvalid as e:
        raise UserError(
            f"--step {step}: {e}; `resilient ckpt list {run_dir}` shows the checkpoints"
        ) from None
    click.echo(f"adapter of step {step} written to {out}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
