"""The spec's `train` section: the optimisation (steps, batch, learning rate and its schedule,
LoRA+, gradient checkpointing, seed, clipping).

Contract: as every section (`sections`): unknown keys refused, frozen, finite and bounded numbers;
a scheduler `transformers.get_scheduler` cannot build from warmup and total steps alone is refused.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from resilient.config.sections import _Section

# Schedulers that `transformers.get_scheduler` cannot build from (optimizer, warmup, total steps)
# alone, or whose step() needs a metric: refused at validation, not in a restart loop.
NEEDS_MORE = (
    "reduce_lr_on_plateau",
    "warmup_stable_decay",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "greedy",
)


def scheduler_names() -> list[str]:
    from transformers import SchedulerType

    return [t.value for t in SchedulerType if t.value not in NEEDS_MORE]


class TrainConfig(_Section):
    """The optimisation."""

    steps: int = Field(100, ge=1, le=10**9, description="Optimizer steps in total.")
    epochs: float | None = Field(
        None,
        gt=0,
        le=10**6,
        description="Train this many passes over the data instead: train.steps is then derived "
        "at launch (sequences x epochs / global batch, rounded up).",
    )
    batch_size: int = Field(4, ge=1, le=65_536, description="Samples per worker per step.")
    lr: float = Field(
        1e-3, gt=0, le=10, description="Peak learning rate (AdamW, shaped by `lr_scheduler`)."
    )
    lr_scheduler: str = Field(
        "constant_with_warmup",
        description="Any name `transformers.get_scheduler` builds from the warmup and total "
        "steps alone: linear, cosine, cosine_with_restarts, polynomial, constant, "
        "constant_with_warmup, inverse_sqrt.",
    )
    warmup_steps: int = Field(0, ge=0, le=10**9, description="Warmup steps of the scheduler.")
    grad_accum_steps: int = Field(
        1,
        ge=1,
        le=65_536,
        description="Microbatches per step on each rank: the global batch is num_workers x "
        "batch_size x grad_accum_steps.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% slower)."
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**31,
        description="Seeds adapter init, dropout and data order; same seed, same adapter.",
    )
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Max gradient norm (0 = no clipping).")
    loraplus_lr_ratio: float = Field(
        0,
        ge=0,
        le=1e4,
        description="LoRA+: the B matrices learn this many times faster than `lr` (peft's "
        "LoRA+ parameter groups; the paper suggests 16). 0 = off; needs peft.method = lora.",
    )

    @field_validator("loraplus_lr_ratio")
    @classmethod
    def _loraplus(cls, v: float) -> float:
        if 0 < v < 1:
            raise ValueError("below 1 would slow the B matrices down; use 0 (off) or >= 1, e.g. 16")
        return v

    @field_validator("lr_scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        names = scheduler_names()
        if v in NEEDS_MORE:
            raise ValueError(
                f"{v!r} needs a metric or arguments beyond the warmup and the total steps, which "
                f"a job does not give it; give one of {', '.join(names)}"
            )
        if v not in names:
            raise ValueError(f"unknown scheduler {v!r}; give one of {', '.join(names)}")
        return v
