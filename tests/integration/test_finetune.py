"""Supervised fine-tuning end to end through the CLI: a chat set with the tokenizer's own chat
template, loss masks, packing, evaluation and trackers; a killed rank changes nothing (adapter bit
for bit, one tracker value per step); early stopping ends SUCCEEDED with its reason; bad data is
counted, and a set with nothing usable is exit 2 before anything starts."""

import json
import random

import pytest

from tests.helpers import adapter, assert_same_adapter, resilient_cli, status, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def _chat(path, n=300):
    r = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randrange(100), r.randrange(100)
            msgs = [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"what is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
        f.write(json.dumps({"messages": [{"role": "robot", "content": "beep"}]}) + "\n")
        f.write(json.dumps({"prompt": "no messages"}) + "\n")
    return path


def _job(tmp_path, name, extra=""):
    chat = _chat(tmp_path / "chat.jsonl")
    spec = write_job(tmp_path, name, steps=30, extra=extra)
    text = spec.read_text().replace('builtin = "tiny-llama"', 'builtin = "tiny-llama-chat"')
    text = text.replace("seq_len = 32", 'seq_len = 96\nformat = "chat"\npacking = true')
    spec.write_text(text.replace(str(tmp_path / "corpus.txt"), str(chat)))
    return spec


def _tensorboard_steps(folder) -> dict[str, list[int]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def test_chat_finetune_survives_a_kill_exactly_and_logs_each_step_once(tmp_path):
    tb = tmp_path / "tb"
    spec = _job(
        tmp_path,
        "chat",
        f'[eval]\nsplit = 0.1\nevery = 10\n[logging]\ntensorboard = "{tb}"\n'
        f'mlflow = "sqlite:///{tmp_path}/mlflow.db"\n',
    )
    r = resilient_cli("data", "inspect", str(spec), "--n", "3", "--json", timeout=120)
    assert r.returncode == 0, r.stdout[-2000:]
    seqs = json.loads(r.stdout[r.stdout.index("[") :])
    assert len(seqs) == 3 and all(0 < s["trained_tokens"] < s["tokens"] for s in seqs)
    assert "plus" in seqs[0]["trained_text"] and "what is" not in seqs[0]["trained_text"]

    clean = resilient_cli("launch", str(spec), "--run-id", "clean", "--set", "logging={}")
    assert clean.returncode == 0, clean.stdout[-3000:]
    assert "2 bad rows left out" in clean.stdout
    kill = resilient_cli(
        "launch",
        str(spec),
        "--run-id",
        "kill",
        "--set",
        'chaos=[{at_step = 17, fault = "kill", rank = 1}]',
    )
    assert kill.returncode == 0, kill.stdout[-3000:]
    runs = tmp_path / "runs" / "chat"
    assert_same_adapter(adapter(runs / "clean"), adapter(runs / "kill"))

    s = status(runs / "kill")
    assert s["restarts"] >= 1 and [e["step"] for e in s["eval"]] == [10, 20, 30]
    assert s["data"]["bad_rows"] == 2 and s["data"]["bad"] == {"missing field": 1, "wrong role": 1}
    assert s["eval"] == status(runs / "clean")["eval"]  # evaluation is part of the exact resume
    steps = _tensorboard_steps(tb)
    assert sorted(steps["train/loss"]) == list(range(1, 31))
    assert sorted(steps["eval/loss"]) == [10, 20, 30]

    import mlflow

    c = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]
    history = sorted(m.step for m in c.get_metric_history(run.info.run_id, "train/loss"))
    assert history == list(range(1, 31))
    assert any(k.endswith(".fault") for k in run.data.tags)

    best = resilient_cli("ckpt", "export", str(runs / "clean"), "--best", str(tmp_path / "best"))
    assert best.returncode == 0, best.stdout
    losses = {e["step"]: e["loss"] for e in s["eval"]}
    assert f"step {min(losses, key=losses.get)}" in best.stdout
    merged = tmp_path / "merged"
    r = resilient_cli("ckpt", "export", str(runs / "kill"), "--step", "30", str(merged), "--merge")
    assert r.returncode == 0, r.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(merged))  # the base's, chat template included
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "what is 1 plus 2?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = AutoModelForCausalLM.from_pretrained(str(merged)).generate(**ids, max_new_tokens=4)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_early_stop_ends_succeeded_with_the_reason(tmp_path):
    # an improvement must beat the best by 100: the second evaluation never does
    spec = _job(
        tmp_path,
        "early",
        "[eval]\nsplit = 0.1\nevery = 4\nearly_stop_patience = 1\nearly_stop_min_delta = 100\n",
    )
    r = resilient_cli("launch", str(spec), "--run-id", "a")
    assert r.returncode == 0, r.stdout[-3000:]
    s = status(tmp_path / "runs" / "early" / "a")
    assert s["state"] == "SUCCEEDED" and s["step"] == 8, s["reason"]
    assert "early stop at step 8" in s["reason"] and "best" in s["reason"]
    assert (tmp_path / "runs" / "early" / "a" / "final" / "adapter_model.safetensors").exists()


def test_a_set_without_one_usable_row_is_exit_2_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "robot", "content": "beep"}]}\n' * 20)
    spec = _job(tmp_path, "none")
    r = resilient_cli("launch", str(spec), "--set", f'data.path="{bad}"', timeout=120)
    assert r.returncode == 2, r.stdout[-2000:]
    assert "none of its 20 rows" in r.stdout and "wrong role" in r.stdout
    assert "Traceback" not in r.stdout and not (tmp_path / "runs").exists()
