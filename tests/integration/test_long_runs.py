"""Long runs: preemption by signal, chaos that must be allowed, and on S3 a journal and metrics
whose objects grow with the run's size, plus a resume that waits out a storage outage instead of
starting over."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from resilient.launcher import shield
from tests.helpers import (
    adapter,
    assert_same_adapter,
    await_gone,
    await_journal,
    background_launch,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]


def await_step(run: str, step: int, timeout: float = 180, env: dict | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = resilient_cli("status", str(run), "--json", timeout=60, env=env)
        if r.returncode == 0 and json.loads(r.stdout)["step"] >= step:
            return
        time.sleep(0.5)
    raise AssertionError(f"{run} did not reach step {step}")


@pytest.mark.parametrize(
    "sig,code",
    [(signal.SIGTERM, 143), pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)],
)
def test_a_signal_stops_after_a_persisted_step_and_resume_is_exact(tmp_path, sig, code):
    spec = write_job(tmp_path, steps=100000)
    sets = ["--set", "checkpoint.every=1"]
    run = tmp_path / "runs" / "t" / "sig"
    with background_launch(str(spec), "--run-id", "sig", *sets) as proc:
        await_step(run, 20)
        t0 = time.time()
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        assert time.time() - t0 < 30
    s = status(run)
    name = signal.Signals(sig).name
    assert s["state"] == "STOPPED" and name in s["reason"]
    assert s["last_checkpoint"] == s["step"] >= 20
    # stopped right at its last step (persisted, not yet exported): the resume only exports
    r = resilient_cli("launch", "--resume", str(run), "--set", f"train.steps={s['step']}")
    assert r.returncode == 0, r.stdout
    assert (run / "final" / "adapter_model.safetensors").exists()
    total = s["step"] + 5  # a resume may extend the run: the same trajectory, bit for bit
    # given relative to the shell's directory: the job (its agents too) gets it absolute
    rel = "runs/t/sig"
    r = resilient_cli("launch", "--resume", rel, "--set", f"train.steps={total}", cwd=tmp_path)
    assert r.returncode == 0, r.stdout
    assert f"-> {run}" in r.stdout and f"-> {rel}" not in r.stdout, r.stdout[:600]
    r = resilient_cli("launch", str(write_job(tmp_path, steps=total)), "--run-id", "clean", *sets)
    assert r.returncode == 0, r.stdout
    assert_same_adapter(adapter(tmp_path / "runs" / "t" / "clean"), adapter(run))


def test_sigterm_to_the_whole_process_group_stops_after_the_same_step_and_persists_it(tmp_path):
    """`timeout` and `kill -TERM -- -PGID` signal the launch's whole process group, the embedded
    cluster's GCS and raylet among them, and systemd's default KillMode every process of the job,
    the ranks too: Ray's processes do not hear it (launcher.shield), so the launch alone stops the
    job, after the same step on every rank, persists that step and exits 143 promptly."""
    spec = write_job(tmp_path, steps=100000)
    run = tmp_path / "runs" / "t" / "group"
    with background_launch(str(spec), "--run-id", "group", "--set", "checkpoint.every=1") as proc:
        await_step(run, 10)
        job = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        for p in job:  # as a control group's stop does: every process, the ranks among them
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 143
        assert time.time() - t0 < 30
    s = status(run)
    assert s["state"] == "STOPPED" and "SIGTERM" in s["reason"], s["reason"]
    assert "its state is persisted" in s["reason"] and s["last_checkpoint"] == s["step"] > 10, s
    assert not [p.pid for p in job if shield.alive(p)]


def test_a_sigkilled_launch_leaves_no_process_of_its_embedded_cluster(tmp_path):
    """`kill -9` of the launch alone (the OOM killer, a drill that kills the driver): Ray's
    processes do not hear SIGTERM and its agents do not end with the raylet; the reaper the launch
    started ends every one of them, so a resume does not start a second cluster beside them."""
    spec = write_job(tmp_path, steps=100000)
    run = tmp_path / "runs" / "t" / "k9"
    with background_launch(str(spec), "--run-id", "k9") as proc:
        await_step(run, 3)
        job = psutil.Process(proc.pid).children(recursive=True)
        names = {p.pid: p.name() for p in job}
        assert any("Agent" in n for n in names.values()), names  # Ray's, beside the raylet
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left = [names[p.pid] for p in await_gone(job, timeout=30)]
        for p in job:  # the old code left Ray's agents running: not past this test
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert not left, left


def test_sigterm_to_the_whole_process_group_before_the_first_step_ends_at_once(tmp_path):
    """The same signal while the job starts (nothing trained yet, nothing to save): the launch
    ends at once, STOPPED and resumable, instead of waiting on the start (Ray's calls hold the main
    thread past any handler), and takes the embedded cluster's processes with it."""
    spec = write_job(tmp_path, steps=8)
    run = tmp_path / "runs" / "t" / "early"
    with background_launch(str(spec), "--run-id", "early") as proc:
        await_journal(run, lambda text: '"PREFLIGHT"' in text)
        job = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 143
        assert time.time() - t0 < 10
    # Ray's processes do not hear the signal: the launch ended them before its exit
    assert not [p.pid for p in job if shield.alive(p)]
    s = status(run)
    assert s["state"] == "STOPPED" and "SIGTERM before this launch trained a step" in s["reason"]
    r = resilient_cli("launch", "--resume", str(run))
    assert r.returncode == 0, r.stdout
    assert status(run)["state"] == "SUCCEEDED"


def test_a_launch_paused_past_the_hang_timeout_blames_no_rank(tmp_path):
    """The launch's process stopped (SIGSTOP: a debugger, a starved or swapped-out driver) for
    longer than `hang_timeout`, then continued: the ranks trained on meanwhile, and the supervisor,
    back, counts none of the time it was away. No fault, no restart; the job goes on."""
    spec = write_job(tmp_path, steps=100000)
    run = tmp_path / "runs" / "t" / "paused"
    sets = ["--set", "supervisor.hang_timeout=3"]
    with background_launch(str(spec), "--run-id", "paused", *sets) as proc:
        await_step(run, 10)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(5.0)  # the pause is the fault: longer than hang_timeout, within fence_s
        proc.send_signal(signal.SIGCONT)
        back = status(run)["step"]
        await_step(run, back + 50)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    s = status(run)
    assert s["restarts"] == 0 and not s["faults"], s["faults"]


def test_a_run_directory_moved_away_mid_run_stops_the_job_with_one_message(tmp_path):
    """The run directory deleted or moved while the job runs: the launch stops at its next
    journal record with one message naming the journal and what to do, exit 2, no traceback, and
    leaves no journal begun in its place (the old code went on with a new journal.jsonl holding
    neither the job's record nor its history: `status` printed None/None, `--resume` failed)."""
    spec = write_job(tmp_path, steps=100000)
    run = tmp_path / "runs" / "t" / "gone"
    with background_launch(str(spec), "--run-id", "gone") as proc:
        await_step(run, 3)
        job = psutil.Process(proc.pid).children(recursive=True)
        run.rename(tmp_path / "moved")
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert f"error: the run's journal {run}/journal.jsonl was removed" in out, out
    assert "Traceback" not in out, out
    assert not (run / "journal.jsonl").exists()
    assert status(tmp_path / "moved")["step"] >= 3  # what was there is whole where it went
    assert not await_gone(job, timeout=30)


def test_chaos_inject_is_refused_unless_allowed(tmp_path):
    spec = write_job(tmp_path, name="noinj", steps=100000)
    run = tmp_path / "runs" / "noinj" / "n"
    with background_launch(str(spec), "--run-id", "n") as proc:
        await_journal(run, lambda text: '"to": "RUNNING"' in text)
        r = resilient_cli("chaos", "inject", str(run), "--fault", "kill", "--rank", "1")
        assert r.returncode == 2 and "--allow-chaos" in r.stdout and "Traceback" not in r.stdout
        assert resilient_cli("stop", str(run)).returncode == 0
        assert proc.wait(timeout=60) == 0
    assert status(run)["restarts"] == 0


def s3_objects(s3, prefix: str) -> list[tuple[str, int]]:
    import boto3

    out = []
    pages = boto3.client("s3", endpoint_url=s3.endpoint).get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket="runs", Prefix=prefix):
        out += [(o["Key"][len(prefix) :], o["Size"]) for o in page.get("Contents", [])]
    return out


STEPS = 150  # enough that the first driver is killed long before its end


@pytest.mark.slow  # CI time: a launch warms 4 workers now; `make test-all` runs it
def test_s3_resume_waits_out_an_outage_and_objects_stay_few(tmp_path, s3):
    spec = write_job(tmp_path, name="s3l", steps=STEPS, storage="s3://runs/long")
    sets = ["--set", "checkpoint.every=1", "--set", "checkpoint.persist_every=2"]
    run = "s3://runs/long/s3l/d"
    cmd = [sys.executable, "-m", "resilient.cli", "launch", str(spec), "--run-id", "d", *sets]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        await_step(run, 30)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies with its Ray, mid-run
        proc.wait()
    s3.stop()  # storage is down when the resume starts
    resume = subprocess.Popen(
        [sys.executable, "-m", "resilient.cli", "launch", "--resume", run],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(8)  # an outage of a fixed length: nothing to await but time
        assert resume.poll() is None, "the resume gave up while storage was down"
        s3.start()
        out, _ = resume.communicate(timeout=300)
    finally:
        if resume.poll() is None:
            os.killpg(resume.pid, signal.SIGKILL)
    assert resume.returncode == 0, out[-3000:]
    assert "storage unreachable" in out
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restores"][-1]["step"] >= 20
    objs = s3_objects(s3, "long/s3l/d/")
    journal = [k for k, _ in objs if k.startswith("journal/")]
    assert journal and not any(k == "journal.jsonl" for k, _ in objs)
    for ds in ("train", "gpu", "host"):
        assert len([k for k, _ in objs if k.startswith(f"metrics/{ds}/")]) <= 2
    r = resilient_cli(
        "launch", str(write_job(tmp_path, name="s3l", steps=STEPS)), "--run-id", "c", *sets
    )
    assert r.returncode == 0, r.stdout
    local = tmp_path / "exported"
    r = resilient_cli("ckpt", "export", run, "--step", str(STEPS), str(local))
    assert r.returncode == 0, r.stdout
    assert_same_adapter(adapter(tmp_path / "runs" / "s3l" / "c"), adapter_dir(local))


def adapter_dir(path):
    from tests.helpers import load_adapter

    return load_adapter(path)
