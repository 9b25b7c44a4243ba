"""The chaos report says what a drill did not do: faults asked for that never struck, with the
reason, and a fault that stopped a rank but was never detected (another fault's restart ended
it), instead of leaving the first out and calling the second "training went on"."""

from rich.console import Console

from resilient.chaos.report import build, print_report
from resilient.rundir.markers import FiredFault

JOB = {"t": 1.0, "type": "job", "name": "n", "run_id": "r", "total_steps": 100, "run_dir": "x"}


def test_a_planned_fault_that_never_struck_is_listed_with_its_reason():
    refused = {
        "t": 2.0,
        "type": "chaos_refused",
        "key": "plan-0",
        "index": 0,
        "fault": "kill",
        "rank": 1,
        "step": 14,
        "error": "rank 1 was not in the job at step 14 (it ran 1 rank(s) then)",
    }
    report = build([JOB, refused, {**refused, "t": 3.0}], [])  # refused again on a resume
    assert report["totals"]["faults"] == 0
    (n,) = report["not_injected"]
    assert (n["fault"], n["rank"], n["step"]) == ("kill", 1, 14)
    assert "not in the job" in n["error"]
    console = Console(width=200, record=True)
    print_report(report, console)
    text = console.export_text()
    assert "not injected: kill rank 1 at step 14: rank 1 was not in the job" in text
    assert "┃" not in text  # no empty table for a drill that struck nothing


def test_a_hang_ended_by_another_faults_restart_is_not_detected_nor_went_on():
    hang = FiredFault("random-0", "hang", 10.0, step=40, rank=1)
    crash = {
        "t": 15.2,
        "type": "fault",
        "kind": "crash",
        "rank": 0,
        "step": 41,
        "detected_at": 15.2,
        "injected_at": 15.0,
        "chaos_key": "random-1",
    }
    decided = {"t": 15.3, "type": "decision", "action": "restart"}
    recovered = {"t": 20.0, "type": "recovered", "recovered_at": 20.0, "recovery_s": 5.0}
    progress = [{"t": t, "type": "progress", "step": s} for t, s in ((9.0, 39), (21.0, 45))]
    report = build([JOB, *progress[:1], crash, decided, recovered, *progress[1:]], [hang])
    (h,) = [f for f in report["faults"] if f["kind"] == "hang"]
    assert h["detected_by"] is None
    assert h["decision"] == "not detected: the crash of rank 0 at step 41 came first (restart)"
    assert "went on" not in h["decision"]
    other = [f for f in report["faults"] if f["kind"] == "crash"][0]
    assert other["recovered_at"] and h["recovered_at"] == other["recovered_at"]


def _shrinking_controller(tmp_path):
    """A chaos controller for a 2-rank job that may shrink to 1, with kills planned for rank 1
    at step 14, rank 0 at step 14 and rank 1 at step 90; its run directory."""
    from resilient.chaos.controller import ChaosController
    from resilient.config import validate_tree
    from resilient.rundir import RunDir
    from resilient.runlog.journal import Journal

    (tmp_path / "c.txt").write_text("x\n")
    spec = validate_tree(
        {
            "name": "c",
            "data": {"path": str(tmp_path / "c.txt")},
            "cluster": {"num_workers": 2, "min_workers": 1},
            "checkpoint": {"storage": str(tmp_path / "runs")},
            "chaos": [
                {"at_step": 14, "fault": "kill", "rank": 1},
                {"at_step": 14, "fault": "kill", "rank": 0},
                {"at_step": 90, "fault": "kill", "rank": 1},
            ],
        }
    )
    rundir = RunDir(str(tmp_path / "runs" / "c" / "r"))
    return ChaosController(spec, rundir, Journal(rundir), None), rundir


def _refused(rundir) -> list[dict]:
    from resilient.runlog.journal import read_records

    return [r for r in read_records(rundir) if r["type"] == "chaos_refused"]


def test_a_planned_fault_whose_step_passes_without_its_rank_is_refused_once(tmp_path):
    """A shrunk job (1 rank) passes the step of a kill planned for rank 1: no worker can fire it,
    so the controller journals it refused, with the reason, once, and no later group gets it in
    its plan (the old code left it out of everything: the drill said nothing)."""
    from types import SimpleNamespace

    from resilient.supervisor.hooks import JobView

    chaos, rundir = _shrinking_controller(tmp_path)
    assert [f.index for f in chaos.plan()] == [0, 1, 2]
    one_rank = SimpleNamespace(size=1, placement=["n1"])

    def tick(step: int) -> None:
        chaos._last_tick = 0.0  # due now
        chaos.tick(JobView(step, 1.0, True, {}, one_rank, None, None))

    tick(13)
    assert not _refused(rundir)
    tick(20)
    tick(21)
    (refused,) = _refused(rundir)
    assert (refused["index"], refused["rank"], refused["step"]) == (0, 1, 14)
    assert "rank 1 was not in the job at step 14 (it ran 1 rank(s) then)" == refused["error"]
    # rank 0 was there: its fault is its worker's (a marker), not refused
    assert [f.index for f in chaos.plan()] == [1, 2]


def test_a_shrunk_job_that_passes_the_step_and_grows_back_between_ticks_refuses_it(tmp_path):
    """The shrunk attempt (after step 10, 1 rank) passes step 14 and the job grows back (after
    step 20, 2 ranks) before a tick saw the step passed: the regrown attempt cannot reach step 14,
    so its plan refuses rank 1's kill with the reason (the old code neither fired nor refused
    it). Rank 0's kill at 14 was its own worker's to fire; the kill at 90 is still ahead."""
    from types import SimpleNamespace

    from resilient.supervisor.hooks import JobView

    chaos, rundir = _shrinking_controller(tmp_path)
    assert [f.index for f in chaos.plan(0, 2)] == [0, 1, 2]
    assert [f.index for f in chaos.plan(10, 1)] == [0, 1, 2]  # the shrunk attempt
    chaos._last_tick = 0.0
    chaos.tick(JobView(12, 1.0, True, {}, SimpleNamespace(size=1, placement=["n1"]), None, None))
    assert not _refused(rundir)
    assert [f.index for f in chaos.plan(20, 2)] == [1, 2]  # grown back: 14 is behind it
    (refused,) = _refused(rundir)
    assert (refused["index"], refused["rank"], refused["step"]) == (0, 1, 14)
    assert "rank 1 was not in the job at step 14 (it ran 1 rank(s) then)" == refused["error"]
    # refused for good, as a tick's refusal is: a rollback to before step 14 does not bring it
    # back, nor say it again
    assert [f.index for f in chaos.plan(5, 2)] == [1, 2]
    assert len(_refused(rundir)) == 1


def test_an_attempt_with_the_rank_that_stopped_short_of_the_step_does_not_hide_the_shrunk_one(
    tmp_path,
):
    """The shrunk attempt A (after step 10, 1 rank) passes step 14 unseen; B (after step 10 again,
    2 ranks: A's newer checkpoint was not yet persisted) dies at step 12; C resumes after step 20,
    A's checkpoint. B had rank 1 but never reached 14, so A passed it without rank 1: refused (the
    first version of the fix asked only the last attempt that began before the step, B)."""
    from types import SimpleNamespace

    from resilient.supervisor.hooks import JobView

    chaos, rundir = _shrinking_controller(tmp_path)

    def seen(step: int, size: int) -> None:
        group = SimpleNamespace(size=size, placement=["n1"] * size)
        chaos.tick(JobView(step, 1.0, True, {}, group, None, None))

    chaos.plan(0, 2)
    seen(9, 2)
    chaos.plan(10, 1)  # A
    seen(12, 1)
    chaos.plan(10, 2)  # B
    seen(12, 2)
    assert not _refused(rundir)
    assert [f.index for f in chaos.plan(20, 2)] == [1, 2]  # C
    (refused,) = _refused(rundir)
    assert (refused["index"], refused["step"]) == (0, 14)
    assert "(it ran 1 rank(s) then)" in refused["error"]


def test_an_attempt_with_the_rank_seen_past_the_step_leaves_it_to_the_marker(tmp_path):
    """Rank 1 was in an attempt seen past step 14 (its worker fired the kill, or its marker is
    out of reach): a later shrunk attempt does not make the controller say it was refused."""
    from types import SimpleNamespace

    from resilient.supervisor.hooks import JobView

    chaos, rundir = _shrinking_controller(tmp_path)
    chaos.plan(0, 2)
    chaos.tick(
        JobView(16, 1.0, True, {}, SimpleNamespace(size=2, placement=["n1"] * 2), None, None)
    )
    chaos.plan(12, 1)
    chaos.plan(20, 2)
    assert not _refused(rundir)


def test_a_shrunk_attempt_seen_past_the_step_refuses_it_at_that_poll(tmp_path):
    """Not at the next once-a-second tick: by then the job may have grown back (and the next
    attempt's polls show the last attempt's step until its first report)."""
    import time
    from types import SimpleNamespace

    from resilient.supervisor.hooks import JobView

    chaos, rundir = _shrinking_controller(tmp_path)
    chaos.plan(10, 1)
    chaos._last_tick = time.time()  # the once-a-second work was just done
    chaos.tick(JobView(16, 1.0, True, {}, SimpleNamespace(size=1, placement=["n1"]), None, None))
    assert [r["index"] for r in _refused(rundir)] == [0]


def test_the_report_fits_an_80_column_terminal_without_cutting_a_word():
    """The old table's borders and padding cut its headers and cells to "recover…",
    "heartbe…", "replac…" on an 80-column terminal."""
    faults = [
        {"kind": "kill", "rank": 1, "step": 41, "detected_by": "actor_death", "decision": "restart"}
        | {"injected_at": 10.0, "detected_at": 10.3, "recovery_s": 0.52, "steps_replayed": 0},
        {"kind": "node_loss", "node": "abcdef123456", "step": 120, "steps_replayed": 14}
        | {"detected_by": "heartbeat_timeout", "injected_at": 20.0, "detected_at": 30.0}
        | {"decision": "replace_node", "recovery_s": None},
    ]
    report = {
        "totals": {"recovered": 1, "faults": 2, "goodput": 0.891},
        "faults": faults,
        "lost_s": {"detection": 0.3},
        "wall_s": 120.0,
    }
    console = Console(width=80, record=True)
    print_report(report, console)
    out = console.export_text()
    assert "…" not in out and max(len(line) for line in out.splitlines()) <= 80, out
    for word in ("recovery", "replayed", "heartbeat", "timeout", "replace", "node_loss", "0.52s"):
        assert word in out, out


def test_a_one_fault_report_keeps_each_cell_on_one_line_at_80_columns():
    """Acceptance 6's report: "restart (kept rank 0)" wrapped although the row fits in 75."""
    fault = {"kind": "crash", "rank": 1, "step": 50, "detected_by": "actor death"}
    fault |= {"injected_at": 10.0, "detected_at": 10.13, "decision": "restart"}
    fault |= {"survivors_kept": [0], "recovery_s": 0.33, "steps_replayed": 4}
    report = {
        "totals": {"recovered": 1, "faults": 1, "goodput": 0.848},
        "faults": [fault],
        "lost_s": {"detection": 0.13},
        "wall_s": 2.3,
    }
    console = Console(width=80, record=True)
    print_report(report, console)
    out = console.export_text()
    assert "restart (kept rank 0)" in out and "actor death" in out, out
