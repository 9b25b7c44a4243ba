"""JobSpec: the one validated tree that describes a job, and the peft table it carries.

Contract: `JobSpec` holds every section (see `sections`), checks what spans sections (chaos targets
that exist, GPU faults on a simulated GPU) and validates the `peft` table against peft itself
(`adapter.peft_config`); `fingerprint()` names what a checkpoint must match to be restored into
it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, field_validator, model_validator

from resilient.catalogue import GPU
from resilient.config.adapter import is_lora, peft_config
from resilient.config.anomaly import AnomalyConfig
from resilient.config.chaos import ChaosConfig
from resilient.config.data import DataConfig, EvalConfig, LoggingConfig
from resilient.config.sections import (
    CheckpointConfig,
    ClusterConfig,
    ModelConfig,
    SupervisorConfig,
    _Section,
)
from resilient.config.train import TrainConfig


class JobSpec(_Section):
    """A whole job. See README "Job spec reference"."""

    name: str = Field(
        ..., min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Job name; a folder name."
    )
    cluster: ClusterConfig = ClusterConfig()
    model: ModelConfig = ModelConfig(builtin="tiny-llama")
    peft: dict[str, Any] = Field(
        default_factory=lambda: {
            "method": "lora",
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
        },
        description="Passed to peft; `method` names the peft type (lora, ia3, ...).",
    )
    data: DataConfig
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    anomaly: AnomalyConfig = AnomalyConfig()
    chaos: ChaosConfig = Field(
        default_factory=ChaosConfig,
        description="Faults on purpose: [[chaos]] entries, or a [chaos] table.",
    )

    @field_validator("peft")
    @classmethod
    def _peft_valid(cls, v: dict[str, Any]) -> dict[str, Any]:
        peft_config(v)
        return v

    @model_validator(mode="after")
    def _cross(self) -> JobSpec:
        if self.train.loraplus_lr_ratio and not is_lora(self.peft):
            raise ValueError(
                'train.loraplus_lr_ratio needs peft.method = "lora" (LoRA+ gives LoRA\'s B '
                f"matrices a larger rate; {self.peft.get('method')!r} has none); set it to 0"
            )
        for i, c in enumerate(self.chaos.plan):
            if c.fault in GPU and self.anomaly.gpu != "simulated":
                raise ValueError(f'chaos[{i}] {c.fault} needs anomaly.gpu = "simulated"')
            if (
                c.node is not None
                and c.node >= self.cluster.local_nodes
                and not self.cluster.address
            ):
                raise ValueError(
                    f"chaos[{i}].node {c.node} does not exist; nodes are "
                    f"0..{self.cluster.local_nodes - 1}"
                )
            if c.rank is not None and c.rank >= self.cluster.num_workers:
                raise ValueError(
                    f"chaos[{i}].rank {c.rank} does not exist; ranks are "
                    f"0..{self.cluster.num_workers - 1}"
                )
            if c.at_step is not None and c.at_step > self.train.steps and not self.train.epochs:
                raise ValueError(
                    f"chaos[{i}].at_step {c.at_step} is past train.steps {self.train.steps}"
                )
            if c.fault == "node_loss" and not self.cluster.address and self.cluster.local_nodes < 2:
                raise ValueError(
                    f"chaos[{i}] node_loss needs several nodes: set cluster.local_nodes >= 2 "
                    "(the embedded single node also runs this driver)"
                )
        return self

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be restorable into this job (not steps, chaos,
        timeouts)."""
        keep = {
            "model": self.model.model_dump(),
            "peft": self.peft,
            "data": self.data.fingerprinted(),
            # The global batch, not the world size: a checkpoint restores at any number of ranks.
            "train": self.train.model_dump(exclude=self._not_fingerprinted()),
            "global_batch": self.global_batch(),
        }
        if self.eval.split:  # held-out samples are not trained on
            keep["eval_split"] = self.eval.split
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def _not_fingerprinted(self) -> set[str]:
        # The per-rank split of the global batch may change between attempts; LoRA+ off is left
        # out so that runs from before the key existed keep their fingerprint.
        keys = {"steps", "batch_size", "grad_accum_steps", "epochs"}
        return keys | ({"loraplus_lr_ratio"} if not self.train.loraplus_lr_ratio else set())

    def global_batch(self) -> int:
        """Samples per optimizer step: `num_workers` x `batch_size` x `grad_accum_steps`, kept when
        the job runs on fewer ranks (each then trains on more microbatches)."""
        t = self.train
        return self.cluster.num_workers * t.batch_size * t.grad_accum_steps
