"""Health on a real local Ray cluster: a flipped bit is caught by the replicas' digests before any
checkpoint holds it (and the run ends bit-equal to a clean one), a node that computes wrong is kept
out by preflight before the first step (and `resilient preflight` prints every node), a node that
goes bad mid-run is caught by the compute audit, and a slowed rank is replaced."""

import glob
import json
import os

import pytest
from safetensors.torch import load_file

from tests.helpers import (
    adapter,
    assert_same_adapter,
    read_journal,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
EVERY = [
    "--set",
    "checkpoint.every=1",
    "--set",
    "checkpoint.persist_every=5",
    "--set",
    "checkpoint.keep=100",
]
THREE = ["--set", "cluster.local_nodes=3"]


def chaos(entry: str) -> list[str]:
    return ["--set", f"chaos=[{entry}]"]


def launch(spec, run_id: str, *args: str):
    r = resilient_cli("launch", str(spec), "--run-id", run_id, *EVERY, *args)
    assert r.returncode == 0, r.stdout
    return r


def test_a_flipped_bit_is_caught_before_any_checkpoint_holds_it(tmp_path):
    spec = write_job(tmp_path, steps=40)
    launch(spec, "clean")
    launch(spec, "flip", *chaos('{at_step = 12, fault = "bitflip", rank = 1}'))
    runs = tmp_path / "runs" / "t"
    s = status(runs / "flip")
    (sdc,) = [f for f in s["faults"] if f["kind"] == "sdc"]
    assert sdc["rank"] == 1 and sdc["step"] == 15 and sdc["recovery_s"] is not None
    assert s["rollbacks"][0]["to_step"] == 10
    # the odd rank was replaced; rank 0 kept its process and loaded the agreed step
    assert {r["rank"]: r["restarts"] for r in s["ranks"]} == {0: 0, 1: 1}, s["ranks"]
    assert_same_adapter(adapter(runs / "clean"), adapter(runs / "flip"))
    compared = 0
    for d in glob.glob(f"{runs}/flip/checkpoints/*"):
        manifest = json.load(open(f"{d}/manifest.json"))
        assert manifest["integrity"]["agreed"], manifest
        twin = f"{runs}/clean/checkpoints/{os.path.basename(d)}/shared.safetensors"
        a, b = load_file(f"{d}/shared.safetensors"), load_file(twin)
        assert all((a[k] == b[k]).all() for k in a), f"{d} holds state the clean run never had"
        compared += 1
    assert compared >= 8
    listed = resilient_cli("ckpt", "list", str(runs / "flip"))
    assert "agreed" in listed.stdout, listed.stdout


def test_preflight_keeps_a_bad_node_out_before_the_first_step(tmp_path):
    spec = write_job(tmp_path, steps=20)
    bad = chaos('{at_step = 1, fault = "bad_compute", node = 2}')
    r = resilient_cli("preflight", str(spec), *THREE, *bad)
    assert r.returncode == 1, r.stdout
    assert "FAIL" in r.stdout and "3 node(s) checked" in r.stdout, r.stdout
    ok = resilient_cli("preflight", str(spec), *THREE, "--json")
    assert ok.returncode == 0 and len(json.loads(ok.stdout)) == 3, ok.stdout
    launch(spec, "bad", *THREE, *bad)
    records = read_journal(tmp_path / "runs" / "t" / "bad")
    first = next(i for i, r in enumerate(records) if r["type"] == "group_ready")
    before = records[:first]
    checked = [r for r in before if r["type"] == "preflight"]
    assert len(checked) == 3 and [r["ok"] for r in checked].count(False) == 1
    (cordon,) = [r for r in before if r["type"] == "cordon"]
    assert cordon["node"] == next(r["node"] for r in checked if not r["ok"])
    assert "known-answer" in cordon["reason"]
    s = status(tmp_path / "runs" / "t" / "bad")
    assert s["state"] == "SUCCEEDED" and len(s["preflight"]) == 3


@pytest.mark.slow  # two 3-node runs: `make test-all`
def test_a_node_that_goes_bad_is_caught_by_the_audit(tmp_path):
    spec = write_job(tmp_path, steps=40)
    audit = ["--set", "checkpoint.audit_every=10", *THREE]
    launch(spec, "clean", *audit)
    launch(spec, "audit", *audit, *chaos('{at_step = 14, fault = "bad_compute", rank = 1}'))
    runs = tmp_path / "runs" / "t"
    s = status(runs / "audit")
    (sdc,) = [f for f in s["faults"] if f["kind"] == "sdc"]
    assert sdc["rank"] == 1 and sdc["step"] == 20 and s["cordoned_nodes"]
    assert s["rollbacks"][0]["to_step"] == 10
    assert_same_adapter(adapter(runs / "clean"), adapter(runs / "audit"))


@pytest.mark.slow  # `make test-all`
def test_a_slowed_rank_is_replaced(tmp_path):
    spec = write_job(tmp_path, steps=600)  # slow for straggler_window_s (5 s) before the end
    launch(spec, "clean")
    launch(spec, "slow", *chaos('{at_step = 20, fault = "slow", rank = 1, factor = 4}'))
    runs = tmp_path / "runs" / "t"
    s = status(runs / "slow")
    (f,) = [f for f in s["faults"] if f["kind"] == "straggler"]
    assert f["rank"] == 1 and f["detected_at"] + f["recovery_s"] - f["injected_at"] <= 30
    assert_same_adapter(adapter(runs / "clean"), adapter(runs / "slow"))
