"""Every fault of the catalogue, injected for real into a job on a local multi-raylet cluster.

Each run must complete, its chaos report must list the fault as recovered, and the final adapter
must equal the fault-free run's bit for bit wherever the fault leaves the data order alone (a `nan`
rollback skips a batch, so it does not). A quick subset runs in CI (`make test`); the whole
catalogue runs with `make test-all` (or `pytest tests/chaos`).
"""

import json

import pytest

from resilient.catalogue import FAULTS
from tests.helpers import (
    adapter,
    assert_same_adapter,
    await_journal,
    background_launch,
    read_journal,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]
NODES = [
    "--set",
    "cluster.local_nodes=3",
    "--set",
    "checkpoint.every=1",
    "--set",
    "checkpoint.persist_every=3",
]
SIM = '\n[anomaly]\ngpu = "simulated"\n'
QUICK = {"kill", "corrupt_checkpoint", "supervisor_kill"}  # the rest: make test-all


def entry(fault: str, at: int = 12, **kw) -> str:
    target = (
        ""
        if FAULTS[fault].target == "job"
        else ("node = 1\n" if FAULTS[fault].target == "node" else "rank = 1\n")
    )
    extra = "".join(f"{k} = {v}\n" for k, v in kw.items())
    return f'\n[[chaos]]\nat_step = {at}\nfault = "{fault}"\n{target}{extra}'


CASES = {
    "kill": entry("kill"),
    "exit": entry("exit"),
    "hang": entry("hang"),
    "slow": entry("slow", 3, factor=3.0),
    "nan": entry("nan"),
    "node_loss": entry("node_loss"),
    "gpu_xid": entry("gpu_xid", xid=79),
    "gpu_lost": entry("gpu_lost"),
    "ecc": entry("ecc", count=2),
    "thermal": entry("thermal", temperature=97.0),
    "storage_outage": entry("storage_outage", 6, seconds=3.0),
    # snapshots every 10 steps: the damaged step 10 is the newest copy everywhere when rank 1
    # dies at 17, known bad in every copy: the job goes on from step 0 (and says so)
    "corrupt_checkpoint": entry("corrupt_checkpoint", 12) + entry("kill", 17),
    "supervisor_kill": entry("supervisor_kill", 10),
    # caught at the next compared step (persisted every 3), rolled back to the one before
    "bitflip": entry("bitflip", 10),
    # node 1 computes wrong from step 10: the audit (every compared step here) finds it
    "bad_compute": entry("bad_compute", 10),
}
assert set(CASES) == set(FAULTS), "every fault of the catalogue has a case"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    r = resilient_cli("launch", str(write_job(d, steps=24, extra=SIM)), "--run-id", "clean", *NODES)
    assert r.returncode == 0, r.stdout
    return d


@pytest.mark.parametrize(
    "fault", [pytest.param(f, marks=() if f in QUICK else pytest.mark.slow) for f in CASES]
)
def test_fault_is_survived(clean, fault):
    spec = write_job(clean, name=fault, steps=24, extra=SIM + CASES[fault])
    every = (
        ["--set", "checkpoint.every=10", "--set", "checkpoint.persist_every=1"]
        if fault == "corrupt_checkpoint"
        else ["--set", "checkpoint.audit_every=3"]
        if fault == "bad_compute"
        else []
    )
    r = resilient_cli("launch", str(spec), "--run-id", "c", *NODES, *every)
    run = clean / "runs" / fault / "c"
    if fault == "supervisor_kill":
        assert r.returncode == -9, r.stdout  # the driver died by SIGKILL, mid-run
        assert status(run)["state"] not in ("SUCCEEDED", "FAILED")
        r = resilient_cli("launch", "--resume", str(run))
    assert r.returncode == 0, r.stdout
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["step"] == 24
    report = json.loads((run / "chaos_report.json").read_text())
    kinds = [f["kind"] for f in report["faults"]]
    assert report["totals"]["faults"] == len(report["faults"]) >= 1
    assert all(f["recovered_at"] for f in report["faults"]), report["faults"]
    assert 0 <= report["goodput"] <= 1 and set(report["lost_s"]) == {
        "detection",
        "teardown",
        "restart",
        "restore",
        "replay",
    }
    if fault == "nan":
        assert s["rollbacks"] and s["rollbacks"][0]["skipped_batches"]
        return
    assert_same_adapter(adapter(clean / "runs" / "t" / "clean"), adapter(run))
    if fault in ("kill", "exit", "hang", "node_loss", "gpu_xid", "gpu_lost", "ecc"):
        assert s["restarts"] >= 1
        assert fault.split("_")[0] in " ".join(kinds) or "crash" in kinds or "hang" in kinds
    if fault in ("gpu_xid", "gpu_lost", "ecc"):
        assert s["cordoned_nodes"]
    if fault == "thermal":
        assert s["restarts"] == 0 and s["events"]
    if fault == "slow":  # replaced (anomaly.straggler_action = "replace")
        assert "straggler" in kinds and s["restarts"] >= 1
    if fault == "bitflip":
        assert "sdc" in kinds and s["rollbacks"]
    if fault == "storage_outage":
        assert any(r["type"] == "persist_error" for r in read_journal(run))
    if fault == "corrupt_checkpoint":
        assert any("checksum" in " ".join(x["skipped"]) for x in s["restores"])


def test_random_chaos_report(tmp_path):
    spec = write_job(tmp_path, name="mtbf", steps=300)
    r = resilient_cli(
        "launch",
        str(spec),
        "--run-id",
        "m",
        "--set",
        "cluster.local_nodes=2",
        "--chaos-mtbf",
        "3s",
        "--chaos-seed",
        "3",
        "--chaos-faults",
        "kill,exit",
    )
    assert r.returncode == 0, r.stdout
    assert "chaos report" in r.stdout
    report = json.loads((tmp_path / "runs" / "mtbf" / "m" / "chaos_report.json").read_text())
    assert report["faults"] and all(
        f["recovered_at"] and f["detected_by"] == "actor death" for f in report["faults"]
    )
    again = resilient_cli(
        "launch",
        str(spec),
        "--run-id",
        "m2",
        "--set",
        "cluster.local_nodes=2",
        "--set",
        "train.steps=1",
        "--chaos-mtbf",
        "3s",
        "--chaos-seed",
        "3",
        "--chaos-faults",
        "kill,exit",
    )
    assert again.returncode == 0

    def chaos(run):
        spec_json = (tmp_path / "runs" / "mtbf" / run / "spec.json").read_text()
        return json.loads(spec_json)["chaos"]["random"]  # a seed and parameters, drawn as it goes

    assert chaos("m") == chaos("m2")  # the same seed gives the same schedule


def test_chaos_inject_from_another_terminal(tmp_path):
    spec = write_job(tmp_path, name="inj", steps=100000)
    run = tmp_path / "runs" / "inj" / "i"
    with background_launch(str(spec), "--run-id", "i", "--allow-chaos") as proc:
        await_journal(run, lambda text: '"to": "RUNNING"' in text)
        r = resilient_cli("chaos", "inject", str(run), "--fault", "kill", "--rank", "1", timeout=60)
        assert r.returncode == 0 and "injected kill at step" in r.stdout, r.stdout
        assert "(rank 1)" in r.stdout, r.stdout
        await_journal(run, lambda text: '"recovered"' in text)
        bad = resilient_cli("chaos", "inject", str(run), "--fault", "meteor", timeout=60)
        assert bad.returncode == 2 and "catalogue" in bad.stdout
        assert resilient_cli("stop", str(run)).returncode == 0
        assert proc.wait(timeout=60) == 0
    s = status(run)
    assert s["state"] == "STOPPED" and s["restarts"] == 1
    (f,) = s["faults"]
    assert (f["kind"], f["rank"]) == ("crash", 1) and f["recovery_s"] > 0
    # the step the kill landed in, from the rank itself (asked just before the strike: a step
    # may end in between): the job went back to a snapshot at most 5 steps before it. The old
    # code took the supervisor's step, up to a heartbeat behind (tens of steps here): the
    # restore came out after the fault
    restored = s["restores"][-1]["step"]
    assert f["step"] - 6 <= restored <= f["step"], (f, s["restores"])
