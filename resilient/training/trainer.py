"""One DDP rank of LoRA fine-tuning, driven step by step.

Contract: after `setup()`, `step(data_step, stop)` runs one optimizer update on this rank's batch of
`data_step` and returns `StepResult` with job-wide agreement on `stop` (any rank asked) and on
`nonfinite` (any rank saw a NaN/Inf loss or grad norm), so every rank takes the same branch after
every step. `snapshot()`/`restore()` capture and reinstate the whole state bit for bit; both are
local (no collective): the state is the same on every rank and random draws are seeded per
(seed, rank, data step).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resilient.checkpoint.snapshot import Snapshot, host_copy, optimizer_parts, optimizer_state
from resilient.config import JobSpec
from resilient.training.data import ByteTokenizer, DataOrder, tokenize_corpus
from resilient.training.model import apply_adapter, load_base, load_trainable, trainable_state


@dataclass(frozen=True)
class StepResult:
    loss: float  # this rank's loss
    mean_loss: float  # mean over ranks
    grad_norm: float
    step_time: float  # seconds, forward to optimizer step
    compute_s: (
        float  # seconds of this rank's own forward pass, before any collective (straggler signal)
    )
    data_wait: float  # seconds spent fetching the batch
    tokens: int  # tokens processed job-wide in this step
    stop: bool  # some rank asked to stop after this step
    nonfinite: bool  # some rank's loss or grad norm was NaN/Inf


class Trainer:
    """Model, adapter, optimizer, scheduler and data of one rank."""

    def __init__(self, spec: JobSpec, rank: int, world: int, base_dir: str, device: torch.device):
        self.spec, self.rank, self.world, self.base_dir, self.device = (
            spec,
            rank,
            world,
            base_dir,
            device,
        )

    def setup(self) -> None:
        self.prepare()
        self.connect()

    def prepare(self) -> None:
        """The rank-independent part (tokenizer, data, base model with the adapter): a warm spare
        does it before it has a rank, so none of it sits on the recovery path."""
        spec = self.spec
        if spec.model.builtin:
            self.tokenizer = ByteTokenizer()
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.base_dir)
        self.samples = tokenize_corpus(spec.data.path, self.tokenizer, spec.data.seq_len)
        self.model = apply_adapter(
            load_base(self.base_dir).to(self.device), spec.peft, spec.train.seed
        )

    def connect(self) -> None:
        """The rank's part: data order, DDP over the initialised process group, optimizer,
        scheduler."""
        spec = self.spec
        self.order = DataOrder(
            len(self.samples), self.world, spec.train.batch_size, spec.train.seed
        )
        self.model.to(self.device)  # a spare prepares on the CPU (it holds no GPU)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # broadcast_buffers=False: buffers (rotary tables) are identical on every rank, and without
        # the broadcast the forward pass has no collective, so its time is this rank's own speed.
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,
        )
        self.optimizer = torch.optim.AdamW(self.params, lr=spec.train.lr)
        warm = spec.train.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / (warm + 1)) if warm else 1.0
        )

    def step(
        self, data_step: int, stop: bool = False, poison: bool = False, slow: float = 1.0
    ) -> StepResult:
        """One optimizer update. `poison` makes this rank's loss NaN (chaos `nan`); `slow` stretches
        this rank's forward pass by that factor (chaos `slow`)."""
        t0 = time.perf_counter()
        # Random draws (dropout) are a function of (seed, rank, data step) alone: no RNG state to
        # checkpoint, so a snapshot needs no collective and a resumed step draws what it drew
        # before.
        torch.manual_seed((self.spec.train.seed * 1_000_003 + data_step) * 65_537 + self.rank)
        batch = self.samples[self.order.batch_indices(data_step, self.rank)].to(self.device)
        t1 = time.perf_counter()
        loss = self.ddp(input_ids=batch, labels=batch).loss
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if slow > 1.0:
            time.sleep((slow - 1.0) * (time.perf_counter() - t1))
        compute = time.perf_counter() - t1
        if poison:
            loss = loss * float("nan")
        loss.backward()
        clip = self.spec.train.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        local_bad = not (math.isfinite(float(loss)) and math.isfinite(grad_norm))
        stats = torch.tensor(
            [float(loss) if not local_bad else 0.0, float(stop), float(local_bad)],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(stats)
        nonfinite = bool(stats[2] > 0)
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)  # never apply a poisoned update
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return StepResult(
            loss=float(loss),
            mean_loss=float(stats[0]) / self.world,
            grad_norm=grad_norm,
            step_time=t2 - t1,
            compute_s=compute,
            data_wait=t1 - t0,
            tokens=batch.numel() * self.world,
            stop=bool(stats[1] > 0),
            nonfinite=nonfinite,
        )

    def snapshot(self, step: int, data_step: int, fingerprint: str) -> Snapshot:
        """The full state after `step` in host memory. Local: DDP keeps it equal on every rank."""
        tensors = {f"model.{k}": v for k, v in trainable_state(self.model).items()}
        optim_tensors, optim_meta = optimizer_parts(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        meta = {
            "optimizer": optim_meta,
            "scheduler": self.scheduler.state_dict(),
            "fingerprint": fingerprint,
            "world_size": self.world,
        }
        return Snapshot(step=step, data_step=data_step, shared=host_copy(tensors), meta=meta)

    def restore(self, snap: Snapshot) -> None:
        """Reinstate the state captured by `snapshot` (every rank, from the same snapshot)."""
        load_trainable(self.model, snap.shared)
        self.optimizer.load_state_dict(optimizer_state(snap.shared, snap.meta["optimizer"]))
        self.scheduler.load_state_dict(snap.meta["scheduler"])


def write_adapter(peft_model, out_dir: str, base_ref: str) -> None:
    """Save the adapter in peft's format; `base_ref` goes into adapter_config's
    base_model_name_or_path."""
    peft_model.save_pretrained(out_dir)
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = base_ref
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def export_to(rundir, trainer: Trainer, rel: str, base_ref: str) -> None:
    """Export the adapter into `rel` of a (possibly remote) run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        write_adapter(trainer.model, tmp, base_ref)
        rundir.upload_dir(tmp, rel)
