"""The spec's sections: one validated model per component, a description on every field.

Contract: every model forbids unknown keys, is frozen, takes only finite numbers and bounds each
one to a sane range; each field's description is the README's spec reference for that key.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from resilient import cpus

DAY, WEEK = 86_400.0, 7 * 86_400.0
MAX_LOCAL_NODES = max(8, cpus.affinity())  # each simulated node is a raylet on this machine


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ClusterConfig(_Section):
    """Where the workers run."""

    address: str = Field(
        "",
        description='"" starts an embedded local Ray; "auto" (the cluster this machine is part '
        'of, e.g. after `ray start --head`) or "HOST:PORT" (its GCS) joins a cluster. For a remote '
        "cluster run the launcher on its head node: `ray job submit -- resilient launch job.toml`.",
    )
    num_workers: int = Field(
        2, ge=1, le=4096, description="Number of DDP ranks, one Ray actor each."
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description='"auto": nccl when the workers have GPUs, else gloo.'
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description="Ray resources each rank reserves, e.g. {CPU = 1, GPU = 1}.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = Field(
        None,
        description="How Ray places the ranks' placement group (one bundle per rank): PACK fills "
        "few nodes, SPREAD uses many; STRICT_* insist. Default: SPREAD over an embedded "
        "cluster's simulated nodes (they exist to be spread over), PACK otherwise.",
    )
    spares: Annotated[int, Field(ge=0, le=4096)] | Literal["auto"] | None = Field(
        "auto",
        description="Warm spare workers, each reserving what a rank does (a GPU spare holds its "
        'GPU and a loaded model). "auto": one per rank on an embedded CPU cluster; on a joined '
        "cluster up to one per rank, in the free capacity of nodes that hold no rank (none "
        "where there is none).",
    )
    local_nodes: int = Field(
        1,
        ge=1,
        le=MAX_LOCAL_NODES,
        description="Embedded Ray only: simulate this many nodes (raylets) on this machine.",
    )
    min_workers: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="Elastic: the job goes on with as few as this many ranks when no more can be "
        "placed (the same global batch, in more microbatches per rank), and grows back to "
        "num_workers when capacity returns. Default: num_workers (never shrink).",
    )

    @model_validator(mode="after")
    def _min_workers(self) -> ClusterConfig:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(
                f"min_workers {self.min_workers} is above num_workers {self.num_workers}; "
                "set cluster.min_workers <= cluster.num_workers"
            )
        return self

    @property
    def least(self) -> int:
        """The fewest ranks the job runs on (`min_workers`, default `num_workers`)."""
        return self.min_workers or self.num_workers

    @field_validator("address")
    @classmethod
    def _joinable(cls, v: str) -> str:
        if v.startswith("ray://"):
            # Ray Client drivers cannot reach the run directory's local files nor the workers'
            # addresses; the launcher must run on the cluster.
            raise ValueError(
                f"{v!r}: Ray Client addresses are not supported; run the launcher on the head "
                "node instead: `ray job submit --address http://HEAD:8265 --working-dir . -- "
                'resilient launch job.toml` with cluster.address = "auto"'
            )
        return v

    @field_validator("resources_per_worker")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: x for k, x in v.items() if not (math.isfinite(x) and x >= 0)}
        if bad or not any(x > 0 for x in v.values()):
            raise ValueError(
                f"every resource must be a finite amount >= 0 and one of them > 0 (got {v}), "
                "e.g. {CPU = 1} or {CPU = 4, GPU = 1}"
            )
        return v


class ModelConfig(_Section):
    """The base model. Exactly one of `path` and `builtin`."""

    path: str = Field(
        "",
        description="A Hugging Face model directory: a local path or an fsspec URI "
        "(s3://bucket/llama); staged into the run directory at launch.",
    )
    builtin: Literal["", "tiny-llama", "tiny-llama-chat"] = Field(
        "",
        description='"tiny-llama": a small Llama model on UTF-8 bytes, built from a config (no '
        'download); "tiny-llama-chat": the same with a BPE tokenizer trained on a generated '
        "corpus and a chat template (for chat fine-tunes without a download).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="The frozen base weights' dtype; bfloat16/float16 also run the forward "
        "pass under autocast (the adapter and optimizer stay float32).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        # Only the shape of the spec here: whether the directory exists is the launcher's check
        # (`launcher.inputs`), since workers on other nodes validate this spec too.
        if bool(self.path) == bool(self.builtin):
            raise ValueError(
                "set exactly one of model.path (a HF model directory or URI) or "
                'model.builtin = "tiny-llama"'
            )
        return self

    @field_validator("path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        return str(Path(v).expanduser().absolute()) if v and "://" not in v else v


# steps of work one recomputed microbatch may cost 0.5% of, by default: a node that goes bad is
# rare, so finding it within a few hundred steps (and replaying them) costs far less than auditing
# more often would on every step of every job (resilient's whole overhead goal is 3%)
AUDIT_SHARE = 1 / 0.005


class CheckpointConfig(_Section):
    """Where and how often state is saved."""

    storage: str = Field(
        "./runs", description="A local path or fsspec URI; the run directory lives below it."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to fsspec for `storage`."
    )
    every: int = Field(1, ge=1, le=10**9, description="Snapshot interval in steps (memory tier).")
    persist_every: int = Field(
        10, ge=1, le=10**9, description="Persist every Nth snapshot to storage (and the last)."
    )
    handoff_s: float = Field(
        1.0,
        ge=0,
        le=DAY,
        description=(
            "Between persisted snapshots, rank 0 gives its node agent (and the peer) the newest "
            "at most this often, in seconds (0 = every snapshot). Every rank keeps its newest "
            "itself, and on a fault a survivor hands that over first, so a restart loses no "
            "step; this bounds the loss only when every rank is lost at once."
        ),
    )
    memory_keep: int = Field(
        2, ge=1, le=1000, description="Newest snapshots each node agent keeps in host memory."
    )
    max_pending: int = Field(
        16, ge=1, le=10_000, description="Snapshots waiting for storage before the oldest drops."
    )
    persist_timeout: float = Field(
        600.0, gt=0, le=WEEK, description="Seconds the end of a job waits for its final persist."
    )
    keep: int = Field(3, ge=1, description="Newest persisted checkpoints kept in storage.")
    keep_every: int = Field(
        0, ge=0, description="Also keep every persisted step that is a multiple of this (0 = off)."
    )
    keep_best: int = Field(
        1,
        ge=0,
        le=1000,
        description="Also keep the N persisted checkpoints with the lowest eval loss (with "
        "[eval]: every evaluated step is persisted); 0 = off.",
    )
    verify_every: int | None = Field(
        None,
        ge=0,
        le=10**9,
        description="Every this many steps the ranks compare a digest of their trainable "
        "parameters and optimizer state (one small all-gather); a mismatch is an `sdc` fault. "
        "Default: every persisted step. Persisted steps (and a stop's or the last) are always "
        "compared: a step is persisted only after its digests agreed. 0 = off.",
    )
    audit_every: int | None = Field(
        None,
        ge=0,
        le=10**9,
        description="At compared steps that are multiples of this, each rank also recomputes one "
        "microbatch of the next rank's work and compares gradient digests (a node whose work "
        "does not reproduce is an `sdc` fault). Default: the first multiple of the compared "
        "interval that keeps the recomputation under 0.5% of training. 0 = off.",
    )

    def checked(self, step: int) -> bool:
        """Whether the ranks compare digests after `step` (persisted steps always are)."""
        if self.verify_every == 0:
            return False
        persisted = self.every * self.persist_every
        return step % persisted == 0 or step % (self.verify_every or persisted) == 0

    def audited(self, step: int, microbatches_per_rank: float) -> bool:
        """Whether `step`'s check includes the compute audit."""
        if self.verify_every == 0 or self.audit_every == 0 or not self.checked(step):
            return False
        interval = self.audit_every
        if interval is None:  # one microbatch recomputed per audit: <= 0.5% of the work between
            base = self.verify_every or self.every * self.persist_every
            need = AUDIT_SHARE / max(microbatches_per_rank, 1e-9)
            interval = base * max(1, -(-int(need) // base))
        return step % interval == 0

    @field_validator("storage")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "://" not in v:
            return str(Path(v).expanduser().resolve())
        return v


class SupervisorConfig(_Section):
    """Failure handling. Timeouts must be ordered: heartbeat_interval < hang_timeout <
    collective_timeout."""

    max_restarts: int = Field(
        5,
        ge=0,
        description="Give up after this many faults in a row, each with fewer than "
        "`progress_steps` steps trained since the previous one.",
    )
    progress_steps: int = Field(
        10, ge=1, description="Steps trained between two faults that end a run of faults."
    )
    max_restarts_per_hour: int = Field(
        0, ge=0, description="Also give up past this many restarts within an hour (0 = off)."
    )
    max_rollbacks: int = Field(
        3,
        ge=0,
        description="NaN/spike rollbacks in a row (without `progress_steps` between) before "
        "giving up; budgeted apart from restarts.",
    )
    heartbeat_interval: float = Field(
        1.0, gt=0, le=3600, description="Seconds between heartbeats to every rank."
    )
    heartbeat_relay: Literal["auto", "on", "off"] = Field(
        "auto",
        description='Who asks the ranks for heartbeats and renews their leases: "on": each node\'s '
        "agent, for the ranks on its node (the driver makes one call per node per interval); "
        '"off": the driver, one call per rank; "auto": the agents from 16 ranks on.',
    )
    hang_timeout: Annotated[float, Field(gt=0, le=DAY)] | Literal["auto"] = Field(
        "auto",
        description='A rank silent, or the job without a finished step, this long is hung. "auto": '
        "learnt from the job's own step and heartbeat gaps (5x the longest seen, plus one "
        "heartbeat interval, at least two intervals; 10 s until 20 steps were seen), journalled "
        "as hang_limits; a number in seconds sets both fixed.",
    )
    collective_timeout: float = Field(
        120.0, gt=0, le=DAY, description="torch.distributed collective timeout in seconds."
    )
    start_timeout: float = Field(
        300.0, gt=0, le=DAY, description="Seconds a worker group may take to start and restore."
    )
    backoff_base: float = Field(
        0.0, ge=0, le=DAY, description="Delay before the 2nd restart; doubles after (first: 0)."
    )
    backoff_max: float = Field(
        30.0, ge=0, le=DAY, description="Upper bound of the restart delay in seconds."
    )
    grace_s: float = Field(
        30.0,
        gt=0,
        le=DAY,
        description="SIGTERM/SIGINT: seconds the job has to stop after the same step and "
        "persist it, before it ends at once.",
    )
    warm_spares: bool = Field(
        True,
        description="Keep started spare workers (`cluster.spares`) so a restart starts no process.",
    )
    keep_survivors: bool = Field(
        True,
        description="A crashed, failed or silent rank (or one whose replica diverged: sdc) is "
        "replaced alone: the other ranks keep their processes and models and rejoin on a new "
        "rendezvous (after an sdc, each loads the agreed step). false: every fault restarts the "
        "whole group.",
    )
    fence_s: float = Field(
        8.0,
        ge=2.0,
        le=DAY,
        description="A worker or node agent that hears nothing from the supervisor for this long "
        "(its node cut off, the driver gone) stops writing to storage and ends itself, so a "
        "partitioned node that comes back writes nothing the job did not ask for.",
    )
    capacity_wait_s: float = Field(
        120.0,
        ge=0,
        le=7 * DAY,
        description="When the healthy nodes cannot hold even cluster.min_workers ranks, wait this "
        "long for capacity (a node joining, a cordon lifted) before the job fails.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> SupervisorConfig:
        hang = 2 * self.heartbeat_interval if self.hang_timeout == "auto" else self.hang_timeout
        if not self.heartbeat_interval < hang < self.collective_timeout:
            raise ValueError(
                "timeouts must be ordered heartbeat_interval < hang_timeout < collective_timeout "
                f"(got {self.heartbeat_interval} < {self.hang_timeout} < {self.collective_timeout})"
            )
        return self
