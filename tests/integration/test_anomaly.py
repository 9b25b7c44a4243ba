"""The anomaly detector end to end: simulated XID cordons a node, straggler, NaN rollback,
Parquet."""

import json

import pandas as pd
import pytest

from tests.helpers import read_journal, resilient_cli, status, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SIM = '\n[anomaly]\ngpu = "simulated"\n'


def test_xid79_cordons_its_node_and_job_completes_on_the_others(tmp_path):
    extra = SIM + '\n[[chaos]]\nat_step = 9\nfault = "gpu_xid"\nxid = 79\nnode = 1\n'
    spec = write_job(tmp_path, steps=20, extra=extra)
    r = resilient_cli("launch", str(spec), "--run-id", "xid", "--set", "cluster.local_nodes=3")
    assert r.returncode == 0, r.stdout
    run = tmp_path / "runs" / "t" / "xid"
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1 and s["events"]["gpu_xid"] == 1
    nodes = next(r["nodes"] for r in read_journal(run) if r["type"] == "nodes")
    assert [c["node"] for c in s["cordoned_nodes"]] == [nodes[1]["node_id"]]
    events = pd.read_parquet(str(run / "events"))
    row = events[events.kind == "gpu_xid"].iloc[0]
    assert (
        json.loads(row.evidence)["xid"] == 79
        and row.action == "cordon"
        and row.node == nodes[1]["node_id"]
    )
    gpu = pd.read_parquet(str(run / "metrics" / "gpu"))
    assert (gpu.xid == 79).any() and len(gpu.node.unique()) == 3
    train = pd.read_parquet(str(run / "metrics" / "train"))
    assert set(train["rank"]) == {0, 1} and train.step.max() == 20
    assert len(pd.read_parquet(str(run / "metrics" / "host"))) > 0


@pytest.mark.slow  # CI time: a launch warms 4 workers now; `make test-all` runs it
def test_slowed_rank_is_reported_as_straggler(tmp_path):
    """anomaly.straggler_action = "warn": reported, not replaced."""
    extra = (
        '\n[[chaos]]\nat_step = 5\nfault = "slow"\nfactor = 3.0\nrank = 1\n'
        '\n[anomaly]\nstraggler_action = "warn"\n'
    )
    spec = write_job(tmp_path, steps=60, extra=extra)
    r = resilient_cli("launch", str(spec), "--run-id", "slow")
    assert r.returncode == 0, r.stdout
    s = status(tmp_path / "runs" / "t" / "slow")
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 0
    assert s["events"].get("straggler") == 1
    ev = pd.read_parquet(str(tmp_path / "runs" / "t" / "slow" / "events"))
    row = ev[ev.kind == "straggler"].iloc[0]
    assert row["rank"] == 1 and json.loads(row.evidence)["ratio"] > 2.0


def test_nan_rolls_back_and_skips_the_batch(tmp_path):
    spec = write_job(
        tmp_path, steps=20, extra='\n[[chaos]]\nat_step = 12\nfault = "nan"\nrank = 0\n'
    )
    r = resilient_cli("launch", str(spec), "--run-id", "nan")
    assert r.returncode == 0, r.stdout
    s = status(tmp_path / "runs" / "t" / "nan")
    assert s["state"] == "SUCCEEDED"
    (rb,) = s["rollbacks"]
    assert (rb["from_step"], rb["to_step"], rb["skipped_batches"]) == (12, 10, [12])
    train = pd.read_parquet(str(tmp_path / "runs" / "t" / "nan" / "metrics" / "train"))
    after = train[(train.attempt == 1)]
    assert 12 not in set(after.data_step) and after.step.max() == 20 and after.data_step.max() == 21
