"""JobSpec: the one validated tree that describes a job, and the peft table it carries.

Contract: `JobSpec` holds every section (see `sections`), checks what spans sections (chaos targets
that exist, GPU faults on a simulated GPU) and validates the `peft` table against peft itself
(`peft_config`); `fingerprint()` names what a checkpoint must match to be restored into it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import Field, field_validator, model_validator

from resilient.catalogue import GPU
from resilient.config.chaos import ChaosConfig
from resilient.config.sections import (
    AnomalyConfig,
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    ModelConfig,
    SupervisorConfig,
    TrainConfig,
    _Section,
)


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
            if c.at_step is not None and c.at_step > self.train.steps:
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
            "data": self.data.model_dump(),
            # The global batch, not the world size: a checkpoint restores at any number of ranks.
            "train": self.train.model_dump(exclude={"steps", "batch_size", "grad_accum_steps"}),
            "global_batch": self.global_batch(),
        }
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    def global_batch(self) -> int:
        """Samples per optimizer step: `num_workers` x `batch_size` x `grad_accum_steps`, kept when
        the job runs on fewer ranks (each then trains on more microbatches)."""
        t = self.train
        return self.cluster.num_workers * t.batch_size * t.grad_accum_steps


def peft_config(table: dict[str, Any]):
    """The peft config for the spec's `peft` table (`method` names the peft type); ValueError
    naming the bad key or method otherwise."""
    from peft import get_peft_config  # heavy: imported only when a spec is validated
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    opts = dict(table)
    method = str(opts.pop("method", "lora")).upper()
    known = {str(k.value if hasattr(k, "value") else k) for k in PEFT_TYPE_TO_CONFIG_MAPPING}
    if method not in known:
        raise ValueError(
            f"peft.method {method.lower()!r} is not a peft type; use one of: "
            + ", ".join(sorted(k.lower() for k in known))
        )
    opts.setdefault("task_type", "CAUSAL_LM")
    if "r" in opts and not (isinstance(opts["r"], int) and opts["r"] >= 1):
        raise ValueError(f"peft.r must be a whole number >= 1 (got {opts['r']!r}), e.g. r = 8")
    try:
        return get_peft_config({"peft_type": method, **opts})
    except TypeError as e:
        raise ValueError(
            f"peft: {e}; check the key against peft's {method.title()}Config"
        ) from None
