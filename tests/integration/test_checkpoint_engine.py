"""The checkpoint engine end to end: memory tier, peer replica, S3 persistence and outages,
corruption."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import (
    adapter,
    assert_same_adapter,
    await_journal,
    background_launch,
    load_adapter,
    read_journal,
    resilient_cli,
    status,
    write_job,
)
from tests.integration.conftest import TcpGate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def chaos(fault: str, at_step: int, rank: int) -> str:
    return f'\n[[chaos]]\nat_step = {at_step}\nfault = "{fault}"\nrank = {rank}\n'


def journal(s3, run: str) -> list[dict]:
    """The journal records of `run` (bucket/prefix) on the S3 server, through the project's reader
    (fsspec's in-process config predates FSSPEC_S3, so the endpoint is given here)."""
    from resilient.rundir import RunDir
    from resilient.runlog.journal import read_records

    return read_records(RunDir(f"s3://{run}", {"client_kwargs": {"endpoint_url": s3.endpoint}}))


def test_s3_kill_restores_from_memory_and_matches_clean_run(tmp_path, s3):
    spec = write_job(tmp_path, storage="s3://runs/jobs", steps=20)
    sets = ["--set", "checkpoint.every=1", "--set", "checkpoint.persist_every=5"]
    r = resilient_cli("launch", str(spec), "--run-id", "clean", *sets)
    assert r.returncode == 0, r.stdout
    spec = write_job(tmp_path, storage="s3://runs/jobs", steps=20, extra=chaos("kill", 12, 1))
    r = resilient_cli("launch", str(spec), "--run-id", "kill", *sets)
    assert r.returncode == 0, r.stdout
    s = status("s3://runs/jobs/t/kill")
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1
    assert s["restores"][0]["tier"] == "memory" and s["restores"][0]["step"] == 11
    assert s["faults"][0]["steps_replayed"] == 0
    fs = s3.fs()
    for run in ("clean", "kill"):
        fs.get(f"runs/jobs/t/{run}/final", str(tmp_path / f"final-{run}"), recursive=True)
    assert_same_adapter(
        load_adapter(tmp_path / "final-clean"), load_adapter(tmp_path / "final-kill")
    )
    r = resilient_cli("ckpt", "verify", "s3://runs/jobs/t/kill")
    assert r.returncode == 0 and "step 20: ok" in r.stdout, r.stdout
    r = resilient_cli("ckpt", "list", "s3://runs/jobs/t/kill")
    assert r.returncode == 0 and "20" in r.stdout and "yes" in r.stdout


@pytest.mark.slow  # CI time: a launch warms 4 workers now; `make test-all` runs it
def test_s3_outage_mid_run_everything_eventually_persisted(tmp_path, s3):
    """The job reaches the store through a TCP gate; the gate then cuts every connection (kept-alive
    ones included) and refuses new ones for 8 s: a real network outage from the job's side."""
    spec = write_job(tmp_path, storage="s3://runs/jobs", steps=300)
    gate = TcpGate(s3.port)
    gate.open()
    env = {
        **os.environ,
        "FSSPEC_S3": json.dumps(
            {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{gate.port}"}}
        ),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resilient.cli",
            "launch",
            str(spec),
            "--run-id",
            "outage",
            "--set",
            "checkpoint.every=1",
            "--set",
            "checkpoint.persist_every=3",
            "--set",
            "checkpoint.max_pending=1000",
            "--set",
            "checkpoint.keep=1000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    fs = s3.fs()
    try:
        deadline = time.time() + 150
        while time.time() < deadline:  # await the first persisted checkpoint, then pull the plug
            if fs.exists("runs/jobs/t/outage/checkpoints/step_00000003/manifest.json"):
                break
            fs.invalidate_cache()
            time.sleep(0.1)
        else:
            pytest.fail("no checkpoint was persisted")
        assert proc.poll() is None, "the job ended before the outage"
        gate.close()
        time.sleep(8)  # the outage itself
        gate.open()
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        gate.close()
    assert proc.returncode == 0, out
    recs = journal(s3, "runs/jobs/t/outage")
    # The outage was felt (a commit failed and was retried, or rode it out in the client's own
    # retries), training went on through it, and every snapshot reached storage afterwards.
    assert any(
        r["type"] == "persist_error" or (r["type"] == "persisted" and r["seconds"] >= 3)
        for r in recs
    )
    persisted = {r["step"] for r in recs if r["type"] == "persisted"}
    assert persisted == set(range(3, 301, 3))
    assert not any(r["type"] == "persist_dropped" for r in recs)
    assert status("s3://runs/jobs/t/outage")["state"] == "SUCCEEDED"


def test_stop_corrupt_newest_then_resume_skips_it(tmp_path):
    spec = write_job(tmp_path, steps=100000)
    sets = ["--set", "checkpoint.persist_every=4"]
    run = tmp_path / "runs" / "t" / "r"
    with background_launch(str(spec), "--run-id", "r", *sets) as proc:
        await_journal(run, lambda text: text.count('"persisted"') >= 2)
        assert resilient_cli("stop", str(run)).returncode == 0
        assert proc.wait(timeout=60) == 0
    s = status(run)
    assert s["state"] == "STOPPED"
    stopped_at = s["step"]
    steps = sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir())
    newest = run / "checkpoints" / f"step_{steps[-1]:08d}" / "shared.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert resilient_cli("ckpt", "verify", str(run)).returncode == 1
    total = stopped_at + 6
    r = resilient_cli("launch", "--resume", str(run), "--set", f"train.steps={total}")
    assert r.returncode == 0, r.stdout
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["step"] == total
    restore = s["restores"][-1]
    assert restore["tier"] == "storage" and restore["step"] == steps[-2]
    assert "checksum" in " ".join(restore["skipped"])
    # resuming from storage is exact too: same adapter as a run of `total` steps never stopped
    r = resilient_cli("launch", str(write_job(tmp_path, steps=total)), "--run-id", "clean", *sets)
    assert r.returncode == 0, r.stdout
    assert_same_adapter(adapter(tmp_path / "runs" / "t" / "clean"), adapter(run))
    out = tmp_path / "exported"
    r = resilient_cli("ckpt", "export", str(run), "--step", str(total), str(out))
    assert r.returncode == 0, r.stdout
    assert_same_adapter(adapter(run), load_adapter(out))
    # the weights as readable as the config beside them (safetensors alone writes 0600)
    mode = lambda f: (out / f).stat().st_mode & 0o777  # noqa: E731
    assert mode("adapter_model.safetensors") == mode("adapter_config.json")


@pytest.mark.slow  # CI time: a launch warms 4 workers now; `make test-all` runs it
def test_node_loss_restores_from_peer_replica(tmp_path):
    spec = write_job(tmp_path, steps=20, extra=chaos("node_loss", 12, 0))
    r = resilient_cli("launch", str(spec), "--run-id", "peer", "--set", "cluster.local_nodes=3")
    assert r.returncode == 0, r.stdout
    s = status(tmp_path / "runs" / "t" / "peer")
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1
    # The survivor (rank 1) hands its newest snapshot (step 10) to its own node before the restart;
    # the lost node's copy had been replicated to a peer node too. Either way: step 10, not storage.
    assert s["restores"] in (
        [{"step": 10, "tier": "memory", "skipped": []}],
        [{"step": 10, "tier": "peer", "skipped": []}],
    )
    records = read_journal(tmp_path / "runs" / "t" / "peer")
    lost = next(r["nodes"] for r in records if r["type"] == "nodes_lost")
    assert next(r for r in records if r["type"] == "restore")["node"] not in lost
    r = resilient_cli("launch", str(write_job(tmp_path, steps=20)), "--run-id", "clean")
    assert r.returncode == 0, r.stdout
    assert_same_adapter(
        adapter(tmp_path / "runs" / "t" / "clean"), adapter(tmp_path / "runs" / "t" / "peer")
    )
