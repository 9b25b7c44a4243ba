"""End-to-end jobs through the CLI on an embedded local Ray with the built-in tiny model."""

import json
import os
import signal

import psutil
import pytest

from tests.helpers import (
    LOWERED_NICE,
    NORMAL_NICE,
    adapter,
    assert_same_adapter,
    await_journal,
    background_launch,
    niceness,
    read_journal,
    resilient_cli,
    status,
    write_job,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def clean_run(work):
    r = resilient_cli("launch", str(write_job(work)), "--run-id", "clean")
    assert r.returncode == 0, r.stdout
    return work / "runs" / "t" / "clean"


def chaos(fault: str, at_step: int, rank: int) -> str:
    return f'\n[[chaos]]\nat_step = {at_step}\nfault = "{fault}"\nrank = {rank}\n'


def test_clean_job_completes_and_adapter_loads(clean_run):
    s = status(clean_run)
    assert (s["state"], s["step"], s["total_steps"], s["restarts"], s["faults"]) == (
        "SUCCEEDED",
        24,
        24,
        0,
        [],
    )
    # every worker (2 ranks, 2 spares) warmed before the first step, none beside training
    types = [r["type"] for r in read_journal(clean_run)]
    (warm,) = [r for r in read_journal(clean_run) if r["type"] == "workers_warm"]
    assert warm["workers"] == 4 and types.index("workers_warm") < types.index("ranks")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((clean_run / "final" / "adapter_config.json").read_text())
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"]),
        str(clean_run / "final"),
    )
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("fault,rank,at_step", [("kill", 1, 12), ("exit", 0, 7)])
def test_dead_worker_is_survived_bit_for_bit(work, clean_run, fault, rank, at_step):
    r = resilient_cli(
        "launch", str(write_job(work, extra=chaos(fault, at_step, rank))), "--run-id", fault
    )
    assert r.returncode == 0, r.stdout
    assert "recovery_s" in r.stdout  # the summary prints recovery time
    run = work / "runs" / "t" / fault
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 1
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], f["step"]) == ("crash", rank, at_step)
    assert f["recovered_at"] > f["detected_at"] >= f["injected_at"] and f["recovery_s"] > 0
    assert f["steps_replayed"] == (at_step - 1) % 5
    assert_same_adapter(adapter(clean_run), adapter(run))


def test_sigstopped_worker_is_a_hang(work, clean_run):
    r = resilient_cli("launch", str(write_job(work, extra=chaos("hang", 9, 1))), "--run-id", "hang")
    assert r.returncode == 0, r.stdout
    s = status(work / "runs" / "t" / "hang")
    (f,) = s["faults"]
    assert (f["kind"], f["rank"], s["state"]) == ("hang", 1, "SUCCEEDED")
    hang_timeout, heartbeat = 4.0, 0.5
    assert f["detected_at"] - f["injected_at"] <= hang_timeout + heartbeat
    assert_same_adapter(adapter(clean_run), adapter(work / "runs" / "t" / "hang"))


def test_budget_spent_gives_up_with_reason(work):
    spec = write_job(work, name="budget", extra=chaos("kill", 3, 0))
    r = resilient_cli("launch", str(spec), "--run-id", "b", "--set", "supervisor.max_restarts=0")
    assert r.returncode == 1, r.stdout
    s = status(work / "runs" / "budget" / "b")
    assert s["state"] == "FAILED" and "max_restarts" in s["reason"]


def test_stop_persists_state_and_ends_stopped(work):
    spec = write_job(work, name="long", steps=100000)
    run = work / "runs" / "long" / "s"
    with background_launch(str(spec), "--run-id", "s") as proc:
        # training is under way (a checkpoint), its ranks journaled
        await_journal(run, lambda text: '"checkpoint"' in text and '"type": "ranks"' in text)
        # each rank trains at normal priority, only Ray's main thread below it (agents.priority)
        (ranks,) = [x["ranks"] for x in read_journal(run) if x["type"] == "ranks"]
        for rank in ranks:
            nice = niceness(rank["pid"])
            assert nice.pop(rank["pid"]) == LOWERED_NICE, nice
            assert set(nice.values()) == {NORMAL_NICE}, nice
        r = resilient_cli("stop", str(run), timeout=120)
        assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout
        assert proc.wait(timeout=60) == 0
    s = status(run)
    assert s["state"] == "STOPPED" and s["last_checkpoint"] == s["step"] > 0


def test_a_restart_takes_no_spare_that_died_while_idle(work):
    """Spares that died while idle (the OOM killer, a node's processes killed), which nothing asks
    anything, are not handed to the restart after a rank's crash: one fault, one restart, not one
    more for each dead spare the restart would have started on."""
    spec = write_job(work, name="spares", steps=100000)
    run = work / "runs" / "spares" / "s"
    with background_launch(str(spec), "--run-id", "s") as proc:
        await_journal(run, lambda text: '"checkpoint"' in text and '"type": "ranks"' in text)
        (ranks,) = [x["ranks"] for x in read_journal(run) if x["type"] == "ranks"]
        pids = {r["pid"] for r in ranks}
        job = psutil.Process(proc.pid).children(recursive=True)
        spares = [p for p in job if "TrainWorke" in p.name() and p.pid not in pids]
        assert len(spares) == 2, spares
        for p in spares:
            p.kill()
        psutil.wait_procs(spares, timeout=10)
        os.kill(ranks[1]["pid"], signal.SIGKILL)
        # trained again after the restart: a checkpoint after the second ranks record
        await_journal(run, lambda text: '"checkpoint"' in (text.split('"type": "ranks"') + [""])[2])
        r = resilient_cli("stop", str(run), timeout=120)
        assert r.returncode == 0, r.stdout
        assert proc.wait(timeout=60) == 0
    s = status(run)
    assert s["restarts"] == 1 and [f["kind"] for f in s["faults"]] == ["crash"], s["faults"]


def test_bad_input_exits_2_without_traceback(work):
    bad = work / "bad.toml"
    bad.write_text('name = 3\n[cluster]\nnum_workers = "two"\nbogus_key = 1\n')
    r = resilient_cli("launch", str(bad), timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stdout and "num_workers" in r.stdout
    r = resilient_cli(
        "launch", str(write_job(work, name="big")), "--set", "cluster.num_workers=64", timeout=120
    )
    assert r.returncode == 2 and "cluster.num_workers" in r.stdout and "Traceback" not in r.stdout
    assert not (work / "runs" / "big").exists() or not any((work / "runs" / "big").iterdir())
    r = resilient_cli("status", str(work / "nowhere"), timeout=60)
    assert r.returncode == 2 and "RUN_DIR" in r.stdout


def test_relayed_heartbeats_see_a_crash_and_a_hang(work, clean_run):
    """The node agent polls the ranks and renews their leases (supervisor.heartbeat_relay): a
    SIGKILL and a SIGSTOP are still seen and survived, bit for bit, and no step record is lost."""
    relay = 'heartbeat_relay = "on"\n'  # BASE_SPEC ends in [supervisor]
    spec = write_job(work, name="relay", extra=relay + chaos("kill", 6, 1) + chaos("hang", 15, 1))
    r = resilient_cli("launch", str(spec), "--run-id", "relay")
    assert r.returncode == 0, r.stdout
    run = work / "runs" / "relay" / "relay"
    s = status(run)
    assert s["state"] == "SUCCEEDED" and s["restarts"] == 2, s
    assert [(f["kind"], f["rank"]) for f in s["faults"]] == [("crash", 1), ("hang", 1)], s
    hang = s["faults"][1]
    assert hang["detected_at"] - hang["injected_at"] <= 4.0 + 0.5, hang  # as a direct heartbeat's
    recs = read_journal(run)
    (first, *_) = [x for x in recs if x["type"] == "ranks"]
    assert all(x["relayed"] for x in first["ranks"]), first
    import pandas as pd

    # the survivor's records of every step reach the metrics, those of the steps it trained
    # between its last gather and each fault too (handed over before the teardown)
    train = pd.read_parquet(str(run / "metrics" / "train"))
    missing = set(range(1, 25)) - set(train[train["rank"] == 0]["step"])
    assert not missing, f"rank 0's records of steps {sorted(missing)} were lost"
    assert_same_adapter(adapter(clean_run), adapter(run))
