"""End-to-end jobs through the CLI on an embedded local Ray with the built-in tiny model."""

import json

import pytest

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
        await_journal(run, lambda text: '"checkpoint"' in text)  # training is under way
        r = resilient_cli("stop", str(run), timeout=120)
        assert r.returncode == 0 and "STOPPED" in r.stdout, r.stdout
        assert proc.wait(timeout=60) == 0
    s = status(run)
    assert s["state"] == "STOPPED" and s["last_checkpoint"] == s["step"] > 0


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
