"""Base models and adapters.

Contract: `build_tiny_llama(dir)` writes the same small Llama-architecture model (weights fixed by a
constant seed, safetensors) every time it is called; `load_base(dir, dtype, gradient_checkpointing)`
loads any local HF causal LM; `apply_adapter(model, table, seed)` gives the same initial adapter for
the same seed.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from resilient.config import peft_config

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
BASE_SEED = 1234  # the built-in base is the same for every job, whatever train.seed says


def build_tiny_llama(out_dir: str, vocab_size: int) -> None:
    """Build and save the built-in tiny Llama (deterministic weights) into `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    cfg = LlamaConfig(
        vocab_size=vocab_size,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=None,
        **TINY_LLAMA,
    )
    with torch.random.fork_rng():
        torch.manual_seed(BASE_SEED)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(out_dir)


def load_base(
    model_dir: str, dtype: str = "float32", gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """The base model in `dtype` (model.dtype), in training mode (dropout, checkpointing on)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load would fill every rank's log
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model.config.use_cache = False
    if gradient_checkpointing:
        # Non-reentrant: works with frozen inputs (no enable_input_require_grads) and under DDP.
        # (Newer transformers call it activation checkpointing.)
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()  # from_pretrained leaves it in eval mode, where HF skips checkpointing


def apply_adapter(model: torch.nn.Module, table: dict[str, Any], seed: int) -> torch.nn.Module:
    """Wrap `model` with a fresh adapter whose initial weights depend only on `seed`."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft reads transformers' renamed `is_gradient_checkpointing`: a warning per load, in
        # every rank's log and every `ckpt` command, about nothing the user can change.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return get_peft_model(model, peft_config(table))


def unused_parameters(model: torch.nn.Module, sample: torch.Tensor) -> list[str]:
    """The trainable parameters a forward pass over `sample` (token ids) gives no gradient. Leaves
    no trace: the RNG is restored and the gradients cleared."""
    with torch.random.fork_rng(devices=[sample.device] if sample.device.type == "cuda" else []):
        batch = sample.reshape(1, -1)
        model(input_ids=batch, labels=batch).loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    return unused


def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a snapshot's adapter tensors (`model.<name>`) into the model's parameters."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in tensors.items():
            if key.startswith("model."):
                p = params[key[6:]]
                p.copy_(t.to(p.device))


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors peft saves for the adapter (`adapter_model.safetensors`' names), on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (the adapter): what a checkpoint must save of the model."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
