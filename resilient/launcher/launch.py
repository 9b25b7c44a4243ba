"""`resilient launch`: from a validated spec to a finished run.

Contract: `launch(spec, run_id)` checks everything a user can get wrong before it starts anything
(`inputs`: run id, storage URI and credentials, storage writable, run directory new, data file,
cluster big enough), raising UserError otherwise and leaving nothing behind; then creates
`<checkpoint.storage>/<name>/<run_id>/` with `spec.json`, the journal and the staged inputs (base
model, tokenised data: `staging`), runs the supervisor with a live progress line, prints the
summary and returns the final status. `resume(run_dir)` continues a run from its journal and newest
persisted checkpoint, waiting out a storage outage (`patience`). SIGTERM and SIGINT stop the job
after the same step on every rank, persisted (`signals`): the status then says which signal
(`signal`: its number). With `anomaly.prometheus_port` the driver serves the job's metrics there.
`journal_durable` is False when storage does not hold the journal's end yet.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time

from rich.console import Console

from resilient.agents.output import LineBuffer
from resilient.config import JobSpec, apply_overrides, validate_tree
from resilient.errors import UserError
from resilient.launcher import inputs, staging
from resilient.launcher.cluster import check_capacity, connect
from resilient.launcher.patience import patiently
from resilient.launcher.progress import ProgressLine, print_summary
from resilient.launcher.signals import Preemption, StopRequests
from resilient.launcher.terminal import RayNotes
from resilient.rundir import RunDir, control, markers
from resilient.rundir.layout import CHAOS_REPORT, SPEC_FILE, base_ref
from resilient.runlog.journal import Journal, JournalLost, journal_exists, read_records
from resilient.runlog.status import fold

END_CLOSE_S = 5.0  # an end from the signals' thread waits this long for the trackers' last writes


def default_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def launch(
    spec: JobSpec,
    run_id: str | None = None,
    console: Console | None = None,
    dashboard_port: int | None = None,
    captured: LineBuffer | None = None,
) -> dict:
    """`captured`: the driver's own output that is not the launcher's (`terminal.Terminal`), put
    into the run's logs."""
    run_id = run_id or default_run_id()
    c = spec.checkpoint
    rundir = inputs.open_run_dir(
        c.storage, spec.name, run_id, c.storage_options, "checkpoint.storage"
    )
    try:
        exists = journal_exists(rundir)
    except Exception as e:
        raise inputs.storage_error("checkpoint.storage", rundir.uri, e) from None
    if exists:
        raise UserError(
            f"run directory {rundir.uri} already exists; pass another --run-id, or "
            f"continue it with `resilient launch --resume {rundir.uri}`"
        )
    with tempfile.TemporaryDirectory(prefix="resilient-inputs-") as tmp:
        model = staging.model_dir(spec, tmp)
        data, stats = inputs.check_data(spec, model, tmp)
        spec = _with_epochs(spec, stats)
        inputs.check_adapter(spec, model)
        existed = rundir.is_local and os.path.isdir(rundir.local_path())
        inputs.check_writable(rundir, "checkpoint.storage")
        return _run(
            spec,
            rundir,
            run_id,
            console or Console(),
            fresh=True,
            dashboard_port=dashboard_port,
            made_dir=rundir.is_local and not existed,
            stage=lambda: staging.stage(rundir, spec, tmp, model, data),
            captured=captured,
            data_stats=stats,
        )


def _with_epochs(spec: JobSpec, stats: dict) -> JobSpec:
    """The spec with train.steps derived from train.epochs (when set) and the prepared data."""
    if not spec.train.epochs:
        return spec
    from resilient.training.prep import steps_for

    tree = spec.model_dump(mode="json")
    tree["train"]["steps"] = steps_for(spec, stats)
    return validate_tree(tree)


def _read_spec(rundir: RunDir, console: Console) -> dict:
    try:
        return patiently(f"read {SPEC_FILE}", lambda: rundir.read_json(SPEC_FILE), console)
    except FileNotFoundError:
        raise UserError(
            f"RUN_DIR {rundir.uri!r} holds no {SPEC_FILE}; give the run directory "
            "printed by `resilient launch`"
        ) from None
    except ValueError as e:
        raise UserError(f"RUN_DIR {rundir.uri!r}: {SPEC_FILE} is damaged ({e})") from None


def resume(
    run_uri: str,
    console: Console | None = None,
    overrides: list[str] | None = None,
    dashboard_port: int | None = None,
    captured: LineBuffer | None = None,
) -> dict:
    """Continue a run whose launcher died or which was stopped (overrides may extend
    train.steps)."""
    console = console or Console()
    if "://" not in run_uri:  # the agents (on other hosts too) get it: never relative to here
        run_uri = os.path.abspath(os.path.expanduser(run_uri))
    try:
        rundir = RunDir(run_uri)
    except Exception as e:
        raise inputs.storage_error("RUN_DIR", run_uri, e) from None
    old = validate_tree(_read_spec(rundir, console))
    spec = validate_tree(apply_overrides(_read_spec(rundir, console), overrides or []))
    if spec.fingerprint() != old.fingerprint() or spec.name != old.name:
        raise UserError(
            "--set with --resume may change train.steps, supervisor.*, chaos and checkpoint "
            "intervals, not what the checkpoints depend on (model, peft, data, train.* but "
            "steps, num_workers)"
        )
    rundir = RunDir(run_uri, spec.checkpoint.storage_options)
    records = patiently("read the journal", lambda: read_records(rundir), console)
    if fold(records)["state"] == "SUCCEEDED" and spec.train.steps <= old.train.steps:
        raise UserError(
            f"run {run_uri} already SUCCEEDED; raise train.steps with --set to train further"
        )
    if overrides:
        patiently(
            f"write {SPEC_FILE}",
            lambda: rundir.write_json(SPEC_FILE, spec.model_dump(mode="json")),
            console,
        )
    with tempfile.TemporaryDirectory(prefix="resilient-inputs-") as tmp:
        return _run(
            spec,
            rundir,
            rundir.uri.rsplit("/", 1)[-1],
            console,
            fresh=False,
            dashboard_port=dashboard_port,
            stage=lambda: staging.stage(rundir, spec, tmp),  # reads inputs only if not staged
            captured=captured,
        )


def write_chaos_report(rundir: RunDir, console: Console) -> dict | None:
    """For a run that had faults, or chaos that could not strike: `<run dir>/chaos_report.json`
    and the table."""
    from resilient.chaos.report import build, print_report

    fired = markers.read_all(rundir)
    records = read_records(rundir)
    if not fired and not any(r["type"] in ("fault", "chaos_refused") for r in records):
        return None
    report = build(records, fired)
    rundir.write_json(CHAOS_REPORT, report)
    print_report(report, console)
    return report


def report_chaos(rundir: RunDir, console: Console) -> None:
    """`write_chaos_report` at the end of a launch: a storage error is said, never raised (the
    journal holds everything the report is built from; `resilient status` still shows it)."""
    try:
        write_chaos_report(rundir, console)
    except Exception as e:  # storage went away at the very end
        console.print(f"chaos report not written ({type(e).__name__}: {e})", highlight=False)


def report_chaos_within(rundir: RunDir, console: Console, timeout_s: float) -> None:
    """`report_chaos` for an end from the signals' thread, given at most `timeout_s`: storage that
    hangs must not hold an exit the user asked for (the process exits, the thread with it)."""
    t = threading.Thread(
        target=report_chaos, args=(rundir, console), daemon=True, name="chaos-report"
    )
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        console.print(
            f"chaos report not written within {timeout_s:g}s: storage did not answer",
            highlight=False,
        )


def _open_journal(
    spec: JobSpec, rundir: RunDir, run_id: str, fresh: bool, console: Console
) -> tuple[Journal, list[dict]]:
    """The run's journal, with its `job` record (a new run) or a `resume` record; and every
    record so far."""
    if fresh:
        rundir.write_json(SPEC_FILE, spec.model_dump(mode="json"))
        journal = Journal(rundir)
        rec = journal.append(
            "job",
            name=spec.name,
            run_id=run_id,
            total_steps=spec.train.steps,
            run_dir=rundir.uri,
            fingerprint=spec.fingerprint(),
            spec=spec.model_dump(mode="json"),
        )
        return journal, [rec]
    # the stop that ended the last life does not end this one
    patiently("clear the last stop request", lambda: control.clear_stop(rundir), console)
    journal = patiently("open the journal", lambda: Journal(rundir), console)
    records = patiently("read the journal", lambda: read_records(rundir), console)
    rec = journal.append("resume", run_dir=rundir.uri, total_steps=spec.train.steps)
    return journal, records + [rec]


def _exporter(spec: JobSpec, journal: Journal, records: list[dict], console: Console):
    """The Prometheus exporter (anomaly.prometheus_port), fed the run's records so far and then
    every record appended; None when off."""
    a = spec.anomaly
    if not a.prometheus_port:
        return None
    from resilient.anomaly.exporter import Exporter

    try:
        exporter = Exporter(a.prometheus_port, a.prometheus_host, a.prometheus_allow_hosts)
    except OSError as e:
        raise UserError(
            f"anomaly.prometheus_port {a.prometheus_port} on {a.prometheus_host}: cannot serve "
            f"({e.strerror or e}); give a free port, or 0 to turn metrics off"
        ) from None
    for rec in records:
        exporter.record(rec)
    journal.listeners.append(exporter.record)
    console.print(
        f"metrics: http://{a.prometheus_host}:{a.prometheus_port}/metrics", highlight=False
    )
    return exporter


def _trackers(spec: JobSpec, journal: Journal, records: list[dict]):
    """The experiment trackers' feed (`logging`), fed every record appended from now on; None
    when no tracker is configured. A resumed run reopens its tracker runs (their ids journalled)
    and logs no step they hold already."""
    if not spec.logging.any:
        return None
    from resilient.anomaly.trackers import Feed, from_spec

    first = next(r for r in records if r["type"] == "job")
    ids = next((r["ids"] for r in reversed(records) if r["type"] == "trackers"), None)
    done = fold(records)
    last_eval = max((e["step"] for e in done["eval"]), default=0)
    trackers = from_spec(spec, first["run_id"], ids, done["step"], last_eval)
    feed = Feed(trackers)
    journal.listeners.append(feed.record)
    journal.append("trackers", ids=trackers.ids)  # W&B's id now; MLflow's at the end
    return feed


def _supervise(
    spec: JobSpec,
    rundir: RunDir,
    journal: Journal,
    records: list[dict],
    console: Console,
    preemption: Preemption,
    captured: LineBuffer | None = None,
) -> dict:
    """Run the supervisor with its real collaborators and a live progress line (the driver's
    `captured` output into the run's logs meanwhile)."""
    from resilient.chaos.controller import ChaosController
    from resilient.supervisor.parts import ray_parts
    from resilient.supervisor.supervisor import Supervisor

    exporter = _exporter(spec, journal, records, console)  # first: a taken port starts nothing
    feed = _trackers(spec, journal, records)
    if feed:  # an end from the signals' thread ends their runs too (else RUNNING for ever)
        preemption.before_exit.append(lambda: feed.trackers.close("FINISHED", END_CLOSE_S))
    requests = StopRequests(control.ControlPoller(rundir).start(), preemption)
    chaos = ChaosController(spec, rundir, journal, requests)
    ref = base_ref(rundir, spec.model.path)
    parts = ray_parts(spec, rundir, ref, requests, chaos, exporter, feed)
    notes = RayNotes(captured, rundir, journal) if captured is not None else None
    status: dict = {}
    try:
        with ProgressLine(console) as progress:
            sup = Supervisor(spec, rundir, journal, parts, records, on_progress=progress.update)
            status = sup.run()
    finally:
        if exporter:
            exporter.close()
        if feed:
            ok = status.get("state") in ("SUCCEEDED", "STOPPED")
            feed.trackers.close("FINISHED" if ok else "FAILED")
            with contextlib.suppress(JournalLost):  # the supervisor's raise says it
                journal.append("trackers", ids=feed.trackers.ids)
        if notes:
            notes.close()
            journal.flush(timeout=10)
    status["journal_durable"] = journal.durable
    if not journal.durable:
        console.print(
            f"[red]the journal's end is not in storage yet ({journal.error}): the run "
            "directory does not show how this life ended[/]"
        )
    return status


def _start(spec: JobSpec, rundir: RunDir, fresh: bool, made_dir: bool):
    """Ray, connected and big enough for the job (a fresh run directory that this launch made is
    removed again, and nothing else, when it is not)."""
    from resilient.agents.reservation import spares_wanted

    spares = spares_wanted(spec)
    conn = connect(spec.cluster, spares)
    # An embedded cluster gets logical CPUs for its spares (not GPUs): only those must fit too.
    cpu_only = not spec.cluster.resources_per_worker.get("GPU")
    try:
        check_capacity(spec, spares if conn.embedded and cpu_only else 0)
    except UserError:
        conn.close()
        if fresh and made_dir:
            try:
                os.rmdir(rundir.local_path())  # empty: the probe is gone; never recursive
            except OSError:
                pass
        raise
    return conn


def _run(
    spec: JobSpec,
    rundir: RunDir,
    run_id: str,
    console: Console,
    fresh: bool,
    dashboard_port: int | None = None,
    made_dir: bool = False,
    stage=None,
    captured: LineBuffer | None = None,
    data_stats: dict | None = None,
) -> dict:
    """`data_stats`: the prepared data's (a new run), journalled and printed."""
    conn = _start(spec, rundir, fresh, made_dir)
    preemption = Preemption(spec.supervisor.grace_s).install()  # after Ray: it has its own
    preemption.before_exit.append(conn.end_now)
    try:
        journal, records = _open_journal(spec, rundir, run_id, fresh, console)
        # an end from the signals' thread reports the faults injected so far, as the main
        # thread's end does (a chaos drill stopped by its user still says what it cost)
        preemption.before_exit.append(lambda: report_chaos_within(rundir, console, END_CLOSE_S))
        console.print(
            f"run {spec.name}/{run_id}: {spec.cluster.num_workers} workers, "
            f"{spec.train.steps} steps -> {rundir.uri}",
            highlight=False,
            soft_wrap=True,
        )
        if data_stats:
            from resilient.training.prep import summary

            journal.append("data", **data_stats)
            console.print(summary(data_stats), highlight=False, soft_wrap=True)
        patiently("stage the inputs", stage, console)
        dash = None
        if dashboard_port:
            from resilient.dashboard.app import serve, url

            dash = serve(rundir, port=dashboard_port, background=True)
            console.print(f"dashboard: {url('127.0.0.1', dashboard_port, None)}", highlight=False)
        t0 = time.time()
        status = _supervise(spec, rundir, journal, records, console, preemption, captured)
        status["signal"] = preemption.signum
        print_summary(status, console, time.time() - t0)
        report_chaos(rundir, console)
        if dash is not None:
            dash.should_exit = True
        return status
    finally:
        conn.close()
        preemption.uninstall()
