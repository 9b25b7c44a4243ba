"""PEFT breadth through the CLI: a method other than plain LoRA survives a killed rank with the
clean run's adapter, bit for bit, and its export loads in peft; a ComPEFT export is much smaller
and `ckpt expand` gives the dense adapter's tensors back, near the dense values."""

import pytest
import torch

from tests.helpers import adapter, assert_same_adapter, load_adapter, resilient_cli, write_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

KILL = ["--set", 'chaos=[{at_step = 6, fault = "kill", rank = 1}]']
CASES = {
    "loraplus": ["--set", "train.loraplus_lr_ratio=16"],
    "p_tuning": ["--set", 'peft={method="p_tuning", num_virtual_tokens=4, encoder_hidden_size=16}'],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_survives_a_kill_bit_exactly_and_loads_in_peft(tmp_path, case):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    spec, runs = str(write_job(tmp_path, steps=12)), tmp_path / "runs" / "t"
    for run_id, extra in (("clean", []), ("kill", KILL)):
        r = resilient_cli("launch", spec, "--run-id", run_id, *CASES[case], *extra)
        assert r.returncode == 0, r.stdout
    assert_same_adapter(adapter(runs / "clean"), adapter(runs / "kill"))
    final = runs / "kill" / "final"
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(runs / "kill" / "base_model"), final
    )
    assert model.peft_config["default"].peft_type.value.lower() == case.replace("loraplus", "lora")
    if case != "loraplus":
        return
    packed, expanded = tmp_path / "compeft", tmp_path / "expanded"
    r = resilient_cli(
        "ckpt", "export", str(runs / "kill"), "--step", "12", str(packed), "--density", "0.2"
    )
    assert r.returncode == 2 and "--compress" in r.stdout, r.stdout
    r = resilient_cli(
        "ckpt", "export", str(runs / "kill"), "--step", "12", str(packed), "--compress", "compeft"
    )
    assert r.returncode == 0 and "smaller" in r.stdout, r.stdout
    r = resilient_cli("ckpt", "expand", str(packed), str(expanded))
    assert r.returncode == 0, r.stdout
    # as readable as the files written beside them (safetensors alone writes 0600)
    for f in (packed / "compeft.safetensors", expanded / "adapter_model.safetensors"):
        assert f.stat().st_mode & 0o777 == (packed / "adapter_config.json").stat().st_mode & 0o777
    dense, back = adapter(runs / "kill"), load_adapter(expanded)
    assert {k: v.shape for k, v in dense.items()} == {k: v.shape for k, v in back.items()}
    flat = lambda t: torch.cat([t[k].flatten() for k in sorted(t)])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(dense), flat(back), dim=0) > 0.5
    ratio = (final / "adapter_model.safetensors").stat().st_size / (
        packed / "compeft.safetensors"
    ).stat().st_size
    assert ratio >= 8
    r = resilient_cli("ckpt", "expand", str(packed), str(packed))  # never over an export
    assert r.returncode == 2 and "not an empty directory" in r.stdout, r.stdout
    # Another base (here one layer fewer) gives another initial adapter: refused, not expanded.
    other, cfg = tmp_path / "other_base", AutoConfig.from_pretrained(runs / "kill" / "base_model")
    cfg.num_hidden_layers = 1
    AutoModelForCausalLM.from_config(cfg).save_pretrained(other)
    r = resilient_cli("ckpt", "expand", str(packed), str(tmp_path / "x"), "--base", str(other))
    assert r.returncode == 2 and "init_sha256" in r.stdout and "Traceback" not in r.stdout
