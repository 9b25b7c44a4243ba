import pytest

from resilient.runlog.status import fold

pytestmark = pytest.mark.timeout(10)


def test_fold_faults_restarts_and_recovery():
    recs = [
        {"t": 1, "type": "job", "name": "n", "run_id": "r", "total_steps": 30},
        {"t": 2, "type": "transition", "from": "PENDING", "to": "RUNNING"},
        {"t": 3, "type": "progress", "step": 13},
        {"t": 4, "type": "fault", "kind": "crash", "rank": 1, "step": 14, "detected_at": 4.0},
        {"t": 4, "type": "decision", "action": "restart"},
        {"t": 4, "type": "restart", "n": 1},
        {"t": 5, "type": "restore", "step": 10, "tier": "storage"},
        {
            "t": 7,
            "type": "recovered",
            "fault_index": 0,
            "recovered_at": 7.5,
            "recovery_s": 3.5,
            "steps_replayed": 3,
        },
        {"t": 9, "type": "transition", "from": "RUNNING", "to": "SUCCEEDED", "cause": "done"},
    ]
    s = fold(recs)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1 and s["total_steps"] == 30
    f = s["faults"][0]
    assert (f["kind"], f["rank"], f["step"], f["recovery_s"], f["recovered_at"]) == (
        "crash",
        1,
        14,
        3.5,
        7.5,
    )
    assert s["restores"] == [{"step": 10, "tier": "storage", "skipped": []}]


def test_goodput_counts_a_fault_that_struck_before_the_first_running():
    from resilient.runlog.accounting import account

    recs = [
        {"t": 1, "type": "job", "name": "n", "run_id": "r", "total_steps": 30},
        {"t": 2, "type": "transition", "from": "PENDING", "to": "STARTING"},
        {
            "t": 3,
            "type": "fault",
            "kind": "crash",
            "rank": 1,
            "step": 14,
            "detected_at": 3.1,
            "injected_at": 3.0,
        },
        {"t": 3.1, "type": "decision", "action": "restart"},
        {"t": 5, "type": "transition", "from": "STARTING", "to": "RUNNING"},
        {
            "t": 5,
            "type": "recovered",
            "fault_index": 0,
            "recovered_at": 5.0,
            "recovery_s": 2.0,
            "steps_replayed": 0,
        },
        {"t": 7, "type": "transition", "from": "RUNNING", "to": "SUCCEEDED", "cause": "done"},
    ]
    r = account(recs)
    assert r["wall_s"] == 4.0  # from the fault, not from the first RUNNING (2 s)
    assert 0 < r["goodput"] < 1 and r["lost_s"]["detection"] == pytest.approx(0.1)


@pytest.mark.parametrize("what", ["does not exist", "is a file, not a run directory"])
def test_a_run_dir_that_is_not_one_is_named_as_such(tmp_path, what):
    """`resilient status PATH` with no directory there, or a file (a spec given by mistake): one
    line that says which (the old code said "holds no journal" for the first and printed a
    NotADirectoryError with credentials advice for the second)."""
    from tests.helpers import resilient_cli

    path = tmp_path / "job.toml"
    if what.startswith("is a file"):
        path.write_text('name = "x"\n')
    r = resilient_cli("status", str(path))
    assert r.returncode == 2, r.stdout
    assert f"RUN_DIR '{path}' {what}; give the run directory printed by" in r.stdout, r.stdout
    assert "Traceback" not in r.stdout and "FSSPEC" not in r.stdout
