"""`resilient launch`: from a validated spec to a finished run.

Contract: `launch(spec, run_id)` checks everything a user can get wrong before it starts anything
(storage writable, run directory new, cluster big enough), raising UserError otherwise; then creates
`<checkpoint.storage>/<name>/<run_id>/` with `spec.json`, the journal and (for a built-in model) the
base model, runs the supervisor with a live progress line, prints the summary and returns the final
status. `resume(run_dir)` continues a run from its journal and newest persisted checkpoint.
"""

from __future__ import annotations

import tempfile
import time

from rich.console import Console

from resilient.config import JobSpec, apply_overrides, validate_tree
from resilient.errors import UserError
from resilient.launcher.cluster import check_capacity, connect
from resilient.launcher.progress import ProgressLine, print_summary
from resilient.rundir import RunDir, control, markers, run_dir_for
from resilient.rundir.layout import BASE_MODEL, CHAOS_REPORT, SPEC_FILE, base_ref
from resilient.runlog.journal import Journal, journal_exists, read_records
from resilient.runlog.status import fold


def default_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def _check_writable(rundir: RunDir, field: str) -> None:
    try:
        rundir.makedirs()
        rundir.write_bytes(".probe", b"ok")
        rundir.remove(".probe")
    except Exception as e:  # any filesystem's refusal, spelled its own way
        raise UserError(
            f"{field} {rundir.uri!r} is not writable ({type(e).__name__}: {e}); give a path or URI "
            "you can write to, with credentials in checkpoint.storage_options if it needs them"
        ) from None


def _prepare_base(spec: JobSpec, rundir: RunDir) -> None:
    if not spec.model.builtin or rundir.exists(f"{BASE_MODEL}/config.json"):
        return
    from resilient.training.data import BYTE_VOCAB
    from resilient.training.model import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llama(tmp, BYTE_VOCAB)
        rundir.upload_dir(tmp, BASE_MODEL)


def launch(
    spec: JobSpec,
    run_id: str | None = None,
    console: Console | None = None,
    dashboard_port: int | None = None,
) -> dict:
    run_id = run_id or default_run_id()
    rundir = run_dir_for(
        spec.checkpoint.storage, spec.name, run_id, spec.checkpoint.storage_options
    )
    if journal_exists(rundir):
        raise UserError(
            f"run directory {rundir.uri} already exists; pass another --run-id, or continue it "
            "with "
            f"`resilient launch --resume {rundir.uri}`"
        )
    _check_writable(rundir, "checkpoint.storage")
    return _run(
        spec, rundir, run_id, console or Console(), fresh=True, dashboard_port=dashboard_port
    )


def resume(
    run_uri: str,
    console: Console | None = None,
    overrides: list[str] | None = None,
    dashboard_port: int | None = None,
) -> dict:
    """Continue a run whose launcher died or which was stopped (overrides may extend
    train.steps)."""
    rundir = RunDir(run_uri)
    if not rundir.exists(SPEC_FILE):
        raise UserError(
            f"RUN_DIR {run_uri!r} holds no {SPEC_FILE}; give the run directory printed by "
            "`resilient launch`"
        )
    old = validate_tree(rundir.read_json(SPEC_FILE))
    spec = validate_tree(apply_overrides(rundir.read_json(SPEC_FILE), overrides or []))
    if spec.fingerprint() != old.fingerprint() or spec.name != old.name:
        raise UserError(
            "--set with --resume may change train.steps, supervisor.*, chaos and checkpoint "
            "intervals, "
            "not what the checkpoints depend on (model, peft, data, train.* but steps, num_workers)"
        )
    rundir = RunDir(run_uri, spec.checkpoint.storage_options)
    state = fold(read_records(rundir))["state"]
    if state == "SUCCEEDED" and spec.train.steps <= old.train.steps:
        raise UserError(
            f"run {run_uri} already SUCCEEDED; raise train.steps with --set to train further"
        )
    if overrides:
        rundir.write_json(SPEC_FILE, spec.model_dump(mode="json"))
    return _run(
        spec,
        rundir,
        rundir.uri.rsplit("/", 1)[-1],
        console or Console(),
        fresh=False,
        dashboard_port=dashboard_port,
    )


def write_chaos_report(rundir: RunDir, console: Console) -> dict | None:
    """For a run that had faults: `<run dir>/chaos_report.json` and the table."""
    from resilient.chaos.report import build, print_report

    fired = markers.read_all(rundir)
    records = read_records(rundir)
    if not fired and not any(r["type"] == "fault" for r in records):
        return None
    report = build(records, fired)
    rundir.write_json(CHAOS_REPORT, report)
    print_report(report, console)
    return report


def _open_journal(spec: JobSpec, rundir: RunDir, run_id: str, fresh: bool) -> Journal:
    """The run's journal, with its `job` record (a new run) or a `resume` record."""
    journal = Journal(rundir)
    if fresh:
        rundir.write_json(SPEC_FILE, spec.model_dump(mode="json"))
        journal.append(
            "job",
            name=spec.name,
            run_id=run_id,
            total_steps=spec.train.steps,
            run_dir=rundir.uri,
            fingerprint=spec.fingerprint(),
            spec=spec.model_dump(mode="json"),
        )
    else:
        control.clear_stop(rundir)  # the stop that ended the last life does not end this one
        journal.append("resume", run_dir=rundir.uri, total_steps=spec.train.steps)
    return journal


def _supervise(spec: JobSpec, rundir: RunDir, journal: Journal, console: Console) -> dict:
    """Run the supervisor with its real collaborators and a live progress line."""
    from resilient.chaos.controller import ChaosController
    from resilient.supervisor.parts import ray_parts
    from resilient.supervisor.supervisor import Supervisor

    poller = control.ControlPoller(rundir).start()
    chaos = ChaosController(spec, rundir, journal, poller)
    parts = ray_parts(spec, rundir, base_ref(rundir, spec.model.path), poller, chaos)
    with ProgressLine(console) as progress:
        return Supervisor(spec, rundir, journal, parts, on_progress=progress.update).run()


def _run(
    spec: JobSpec,
    rundir: RunDir,
    run_id: str,
    console: Console,
    fresh: bool,
    dashboard_port: int | None = None,
) -> dict:
    conn = connect(spec.cluster)
    try:
        try:
            check_capacity(spec)
        except UserError:
            if fresh:
                rundir.remove("")
            raise
        journal = _open_journal(spec, rundir, run_id, fresh)
        console.print(
            f"run {spec.name}/{run_id}: {spec.cluster.num_workers} workers, "
            f"{spec.train.steps} steps -> {rundir.uri}",
            highlight=False,
            soft_wrap=True,
        )
        _prepare_base(spec, rundir)
        dash = None
        if dashboard_port:
            from resilient.dashboard.app import serve, url

            dash = serve(rundir, port=dashboard_port, background=True)
            console.print(f"dashboard: {url('127.0.0.1', dashboard_port, None)}", highlight=False)
        t0 = time.time()
        status = _supervise(spec, rundir, journal, console)
        print_summary(status, console, time.time() - t0)
        write_chaos_report(rundir, console)
        if dash is not None:
            dash.should_exit = True
        return status
    finally:
        conn.close()
