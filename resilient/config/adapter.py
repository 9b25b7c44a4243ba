"""The spec's `peft` table: which peft method, with that method's own config keys.

Contract: `peft_config(table)` builds the peft config the table names (`method`: a peft type such
as lora, ia3, loha, lokr, prefix_tuning, prompt_tuning, p_tuning) or raises ValueError naming the
bad key and the fix: a method peft does not know, a key that is not a field of the method's config
class (with the nearest key it may have meant), a key resilient sets itself, or a value peft's own
checks refuse. `is_lora(table)` tells whether the method has LoRA's B matrices (LoRA+ needs them).
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

# Config fields resilient owns: the task is always causal LM training, and what peft records
# about a saved adapter (base model, version, inference mode) is written at export.
RESERVED = {
    "peft_type": "name the method with `method`",
    "task_type": "resilient trains causal LMs (CAUSAL_LM)",
    "inference_mode": "resilient trains the adapter; exports are saved for inference by peft",
    "base_model_name_or_path": "exports name the run's base model themselves",
    "revision": "the base model is model.path or model.builtin",
    "auto_mapping": "set by peft",
    "peft_version": "set by peft",
}

# LoRA initialisations that rewrite the base weights (PiSSA, OLoRA, LoftQ, CorDA) or need a data
# pass before training (EVA): an exported adapter would not fit the run's unchanged base.
REWRITES_BASE = ("pissa", "olora", "loftq", "corda", "eva")


def config_class(method: str):
    """peft's config class for `method` (case-insensitive); ValueError listing the methods."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # heavy: only when a spec is checked

    by_name = {
        str(getattr(k, "value", k)).lower(): v for k, v in PEFT_TYPE_TO_CONFIG_MAPPING.items()
    }
    if method.lower() not in by_name:
        raise ValueError(
            f"peft.method {method.lower()!r} is not a peft type; use one of: "
            + ", ".join(sorted(by_name))
        )
    return by_name[method.lower()]


def peft_config(table: dict[str, Any]):
    """The peft config for the spec's `peft` table; ValueError naming the bad key otherwise."""
    opts = dict(table)
    method = str(opts.pop("method", "lora")).lower()
    cls = config_class(method)
    fields = {f.name for f in dataclasses.fields(cls) if f.init} - set(RESERVED)
    if str(opts.get("task_type", "CAUSAL_LM")).upper() == "CAUSAL_LM":
        opts.pop("task_type", None)  # what resilient sets anyway (specs of earlier runs hold it)
    for key in opts:
        if key in RESERVED:
            raise ValueError(f"peft.{key} cannot be set ({RESERVED[key]}); remove it")
        if key not in fields:
            near = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean peft.{near[0]}? " if near else ""
            raise ValueError(
                f"peft.{key} is not a key of peft's {cls.__name__} (method {method!r}); {hint}"
                f"its keys are documented at https://huggingface.co/docs/peft under {cls.__name__}"
            )
    for key in ("r", "num_virtual_tokens"):
        v = opts.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"peft.{key} must be a whole number >= 1 (got {v!r}), e.g. {key} = 8")
    init = str(opts.get("init_lora_weights", "")).lower()
    if init.startswith(REWRITES_BASE):
        raise ValueError(
            f"peft.init_lora_weights = {opts['init_lora_weights']!r} changes the base model's "
            "weights (or needs data before training), which resilient's exports do not carry; "
            'use true, false or "gaussian"'
        )
    try:
        cfg = cls(task_type="CAUSAL_LM", **opts)
    except (TypeError, ValueError) as e:  # peft's own checks (__post_init__) on the values
        raise ValueError(f"peft ({method}): {e}") from None
    if cfg.is_prompt_learning and not cfg.num_virtual_tokens:
        raise ValueError(f"peft.num_virtual_tokens is required by {method}, e.g. = 8")
    return cfg


def is_lora(table: dict[str, Any]) -> bool:
    """The method is LoRA (DoRA included: `use_dora` is a LoRA option)."""
    return str(table.get("method", "lora")).lower() == "lora"


def is_prompt_learning(table: dict[str, Any]) -> bool:
    """The method prepends virtual tokens (prefix, prompt and P-tuning): the model then sees
    `num_virtual_tokens` more positions than `data.seq_len`."""
    return bool(peft_config(table).is_prompt_learning)
