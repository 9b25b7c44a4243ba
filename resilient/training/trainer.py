"""One DDP rank of adapter (peft) fine-tuning, driven step by step.

Contract: after `setup()`, `step(data_step, stop)` runs one optimizer update over this rank's share
of `data_step`'s microbatches (`training.data`: the step's samples depend on the step alone, split
over the ranks present), the forward pass under autocast when `model.dtype` is bfloat16/float16,
with a gradient scaler for float16. Each microbatch's loss is scaled by world / microbatches, so the
all-reduced gradient is the mean over the same global batch at every world size. It returns
`StepResult` with job-wide agreement on `stop` (any rank asked) and on `nonfinite` (any rank saw a
NaN/Inf loss or grad norm), so every rank takes the same branch after every step.
`snapshot()`/`restore()` capture and reinstate the whole state bit for bit; both are local (no
collective): the state is the same on every rank and random draws are seeded per (seed, data step,
microbatch), so a snapshot restores at any world size. `connect()` may be called again on a new
process group (a survivor rejoining, possibly at another world size): it builds a new DDP wrapper,
optimizer and scheduler around the same model. The optimizer is `optim.build_optimizer`'s (AdamW,
or LoRA+'s parameter groups); the learning rate follows `transformers.get_scheduler(
train.lr_scheduler)`. Any peft method works: `prepare()` finds adapter parameters a forward pass
leaves without a gradient, and DDP is then told to look for unused parameters. A microbatch is the
staged sequences' `collate` (labels -100 where no loss; packed rows with their position ids and
block mask). `evaluate(step)` runs `evaluation.evaluate` between steps (same numbers on every
rank) and updates the early-stopping state, which `snapshot()` carries.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from resilient.checkpoint.snapshot import Snapshot, host_copy, optimizer_parts, optimizer_state
from resilient.config import JobSpec
from resilient.training.data import DataOrder, StagedData, share
from resilient.training.evaluation import EvalState, evaluate
from resilient.training.grad_capture import GradCapture
from resilient.training.integrity import audit_target, digest
from resilient.training.model import (
    apply_adapter,
    load_base,
    load_trainable,
    unused_parameters,
)
from resilient.training.optim import build_optimizer


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
    overflow: bool = False  # float16: the gradient scaler skipped this update (not a fault)
    pause: bool = False  # some rank asked to pause after this step (a resize)
    lr: float = 0.0  # the learning rate this update used
    digests: tuple[tuple[int, int, int], ...] = ()  # a checked step: every rank's (state, own
    # gradient, audit) digests, as `integrity.judge` takes them


class Trainer:
    """Model, adapter, optimizer, scheduler and data of one rank."""

    def __init__(
        self,
        spec: JobSpec,
        rank: int,
        world: int,
        base_dir: str,
        device: torch.device,
        data_dir: str | None = None,
    ):
        """`data_dir`: the staged, tokenised sets (workers); None prepares `data.path` here
        (benchmarks and tools on the driver's machine)."""
        self.spec, self.rank, self.world, self.base_dir, self.device = (
            spec,
            rank,
            world,
            base_dir,
            device,
        )
        self.data_dir = data_dir
        self.corrupt = False  # chaos `bad_compute`: this rank's node computes subtly wrong

    def _seed(self, data_step: int, index: int) -> None:
        # Random draws (dropout) are a function of (seed, data step, microbatch) alone: no RNG
        # state to checkpoint, and the same draws at any world size. Only the generator this
        # rank draws from is seeded: torch.manual_seed also queues a seeding of each accelerator
        # type not started here (CUDA, XPU, MTIA), recording a traceback for each: 0.1-0.3 ms a
        # microbatch, 0.7% of the bench's step.
        seed = (self.spec.train.seed * 1_000_003 + data_step) * 65_537 + index
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # the rank's one GPU (started by now: no queueing)

    def _loss(self, module, batch: dict) -> torch.Tensor:
        """A microbatch's loss under autocast; a bad_compute node's is off by a part in 2^10
        (which the loss curve does not show and the gradients carry)."""
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
        ):
            loss = module(**batch).loss.float()
        return loss * (1 + 2**-10) if self.corrupt else loss

    def setup(self) -> None:
        self.prepare()
        self.connect()

    def prepare(self) -> None:
        """The rank-independent part (tokenizer, data, base model with the adapter): a warm spare
        does it before it has a rank, so none of it sits on the recovery path."""
        spec = self.spec
        deterministic(self.device)  # before the probe below first starts cuBLAS
        self.data = StagedData(self.data_dir or self._prepare_here())
        self.evals = EvalState()
        base = load_base(self.base_dir, spec.model.dtype, spec.train.gradient_checkpointing)
        self.model = apply_adapter(base.to(self.device), spec.peft, spec.train.seed)
        # DDP must be told of adapter parameters some forward pass leaves out (it would hang or
        # fail in the next step otherwise); looking once costs one short forward and backward.
        first = torch.from_numpy(self.data.train.get("input_ids", 0)[:8].astype("int64"))
        self.unused = unused_parameters(self.model, first.to(self.device))

    def _prepare_here(self) -> str:
        from resilient.training.encode import load_tokenizer
        from resilient.training.prep import prepare

        self._tmp = tempfile.TemporaryDirectory(prefix="resilient-data-")
        out = os.path.join(self._tmp.name, "data")
        tokenizer = load_tokenizer(self.spec.model.builtin, self.base_dir)
        prepare(self.spec, tokenizer, out, self._tmp.name)
        return out

    def connect(self) -> None:
        """The rank's part: data order, DDP over the initialised process group, optimizer,
        scheduler."""
        from transformers import get_scheduler

        spec, t = self.spec, self.spec.train
        deterministic(self.device)
        # A step is the global batch of the nominal world (num_workers), whatever the world now.
        self.order = DataOrder(len(self.data.train), spec.global_batch(), t.batch_size, t.seed)
        if self.world > self.order.count:  # a rank without a microbatch would skip the all-reduce
            raise ValueError(
                f"{self.world} ranks for {self.order.count} microbatches a step: at most "
                "cluster.num_workers x train.grad_accum_steps ranks"
            )
        self.model.to(self.device)  # a no-op where a spare prepared on this device already
        # A survivor's model may hold the partial gradients of the step its peer's death broke.
        self.model.zero_grad(set_to_none=True)
        # the adapter's parameters by name, looked up once: walking the model's modules for them
        # took 0.15 ms, a third of each step's snapshot
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in self.trainable]
        # No buffer sync in the forward pass: buffers (rotary tables) are identical on every rank,
        # and without it the forward pass has no collective, so its time is this rank's own speed.
        ddp = torch.nn.parallel.DistributedDataParallel
        no_sync = (
            {"forward_sync_buffers": False}
            if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False}
        )
        self.ddp = ddp(
            self.model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(self.unused),
            **no_sync,
        )
        unused = {id(p) for n, p in self.model.named_parameters() if n in set(self.unused)}
        self.capture = GradCapture(self.ddp, self.params, unused)
        self.optimizer = build_optimizer(self.model, self.params, t)
        self.scheduler = get_scheduler(
            t.lr_scheduler,
            self.optimizer,
            num_warmup_steps=t.warmup_steps,
            num_training_steps=t.steps,
        )
        amp = spec.model.dtype
        self.amp_dtype = None if amp == "float32" else getattr(torch, amp)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "float16")

    def step(
        self,
        data_step: int,
        stop: bool = False,
        poison: bool = False,
        slow: float = 1.0,
        pause: bool = False,
        check: bool = False,
        audit: bool = False,
    ) -> StepResult:
        """One optimizer update. `poison` makes this rank's loss NaN (chaos `nan`); `slow` stretches
        this rank's forward pass by that factor (chaos `slow`); `stop` and `pause` are agreed on
        job-wide. `check` (every rank alike): the gradients are all-reduced here rather than by
        DDP, so this rank's own gradient of its first microbatch can be digested, and after the
        update every rank's digests are all-gathered into `digests`; `audit`: this rank also
        recomputes the first microbatch of `integrity.audit_target`'s share and digests it."""
        t0 = time.perf_counter()
        mine = share(self.order.count, self.rank, self.world)
        micro = [self._batch(self.order.microbatch(data_step, i)) for i in mine]
        lr = float(self.scheduler.get_last_lr()[0])
        t1 = time.perf_counter()
        loss_sum, compute, own = self._backward(data_step, mine, micro, poison, slow, check)
        audited = self._audit(data_step) if check and audit else 0
        self.scaler.unscale_(self.optimizer)
        clip = self.spec.train.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        # With a gradient scaler an infinite gradient is an overflow the scaler skips (and lowers
        # its scale for), not a fault; the same on every rank, since gradients are all-reduced.
        overflow = not math.isfinite(grad_norm) and self.scaler.is_enabled()
        bad_grad = not math.isfinite(grad_norm) and not overflow
        local_bad = not math.isfinite(loss_sum) or bad_grad
        stats = torch.tensor(
            [loss_sum if not local_bad else 0.0, len(mine), stop, local_bad, pause],
            dtype=torch.float64,
            device=self.device,
        )
        dist.all_reduce(stats)
        nonfinite = bool(stats[3] > 0)
        if not nonfinite:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
        self.scaler.update()  # (a no-op without scaling) ends this step's unscale_
        self.optimizer.zero_grad(set_to_none=True)  # a poisoned update is never applied
        digests = self.gather_digests(own, audited) if check else ()
        t2 = time.perf_counter()
        return StepResult(
            loss=loss_sum / max(1, len(mine)),
            mean_loss=float(stats[0]) / max(1.0, float(stats[1])),
            grad_norm=grad_norm,
            step_time=t2 - t1,
            compute_s=compute,
            data_wait=t1 - t0,
            tokens=self._step_tokens(data_step),  # the global batch's, every rank's
            stop=bool(stats[2] > 0),
            nonfinite=nonfinite,
            overflow=overflow,
            pause=bool(stats[4] > 0),
            lr=lr,
            digests=digests,
        )

    def state_digest(self) -> int:
        """The replica's trainable parameters and optimizer state, as one number."""
        state = [p.detach() for _, p in sorted(self.trainable, key=lambda np: np[0])]
        for p in self.params:  # parameter order: the optimizer's own is insertion order
            held = self.optimizer.state.get(p, {})
            state.extend(v for _, v in sorted(held.items()) if torch.is_tensor(v))
        return digest(state)

    def flip_bit(self, step: int) -> str:
        """Chaos `bitflip`: one low mantissa bit of one nonzero trainable value flips (a change of
        about 2^-15 of it: the loss does not show it); which value follows from `step`."""
        p = next(p for p in self.params if bool(p.detach().ne(0).any()))
        flat = p.detach().view(-1)
        nonzero = flat.ne(0).nonzero().view(-1)
        i = int(nonzero[step % len(nonzero)])
        ints = flat.view(torch.int32 if flat.element_size() == 4 else torch.int16)
        ints[i] ^= 1 << (8 if flat.element_size() == 4 else 0)
        return f"bit of element {i} of a {tuple(p.shape)} parameter"

    def gather_digests(self, own: int = 0, audited: int = 0) -> tuple[tuple[int, int, int], ...]:
        """Every rank's (state digest, `own`, `audited`), all-gathered (a collective)."""
        row = torch.tensor([self.state_digest(), own, audited], dtype=torch.int64)
        rows = [torch.zeros(3, dtype=torch.int64) for _ in range(self.world)]
        if self.device.type == "cuda":  # nccl gathers device tensors
            row, rows = row.to(self.device), [r.to(self.device) for r in rows]
        dist.all_gather(rows, row)
        return tuple(tuple(int(x) for x in r.cpu()) for r in rows)

    def _own_digest(self) -> int:
        return digest(None if id(p) in self.capture.unused else p.grad for p in self.params)

    def _audit(self, data_step: int) -> int:
        """The gradient digest of the first microbatch of the audit target's share, recomputed
        here on the plain model (autograd.grad: no DDP hook fires, .grad is untouched)."""
        target = audit_target(self.rank, self.world)
        index = share(self.order.count, target, self.world)[0]
        batch = self._batch(self.order.microbatch(data_step, index))
        self._seed(data_step, index)
        loss = self._loss(self.model, batch)
        scaled = self.scaler.scale(loss * (self.world / self.order.count))
        grads = torch.autograd.grad(scaled, self.params, allow_unused=True)
        return digest(grads)

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.data.batch(self.data.train, indices).items()}

    def _step_tokens(self, data_step: int) -> int:
        """Tokens (padding not counted) of every microbatch of `data_step`."""
        return sum(
            self.data.tokens(self.order.microbatch(data_step, i)) for i in range(self.order.count)
        )

    def evaluate(self, step: int) -> dict | None:
        """Evaluate on the staged evaluation set (every rank a share, summed job-wide; no
        gradient, no random draw: training goes on as if it had not happened) and update the
        early-stopping state; the metrics (`evaluation.evaluate`), or None without a set."""
        if self.data.eval is None:
            return None
        was_training = self.model.training
        self.model.eval()
        try:
            metrics = evaluate(self, step)
        finally:
            self.model.train(was_training)
        self.evals.observe(step, metrics, self.spec.eval)
        return metrics

    def _backward(
        self,
        data_step: int,
        mine: list[int],
        micro: list[torch.Tensor],
        poison: bool,
        slow: float,
        local: bool = False,
    ) -> tuple[float, float, int]:
        """Forward and backward over this rank's microbatches (indices `mine`, samples `micro`);
        (the sum of their losses, seconds of this rank's own forward passes, and with `local` the
        digest of the first microbatch's local gradient)."""
        # world / count: the all-reduce averages over ranks, so the gradient is the mean over every
        # microbatch of the step however many ranks share them.
        scale = self.world / self.order.count
        total, compute, own = 0.0, 0.0, 0
        for n, (index, batch) in enumerate(zip(mine, micro, strict=True)):
            self._seed(data_step, index)
            # Gradients are all-reduced once, in the last microbatch's backward pass.
            last = n == len(mine) - 1
            # the first microbatch's own gradient: local under no_sync, else seen by the hook
            self.capture.armed = local and n == 0 and last
            with contextlib.nullcontext() if last else self.ddp.no_sync():
                tf = time.perf_counter()
                part = self._loss(self.ddp, batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                if slow > 1.0:
                    time.sleep((slow - 1.0) * (time.perf_counter() - tf))
                compute += time.perf_counter() - tf
                if poison and n == 0:
                    part = part * float("nan")
                self.scaler.scale(part * scale).backward()
            if local and n == 0:
                own = self.capture.digest() if last else self._own_digest()
            total += float(part.detach())
        return total, compute, own

    def snapshot(self, step: int, data_step: int, fingerprint: str) -> Snapshot:
        """The full state after `step` in host memory. Local: DDP keeps it equal on every rank."""
        tensors = {f"model.{n}": p.detach() for n, p in self.trainable}
        optim_tensors, optim_meta = optimizer_parts(self.optimizer.state_dict())
        tensors.update(optim_tensors)
        meta = {
            "optimizer": optim_meta,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "fingerprint": fingerprint,
            "world_size": self.world,
            "evals": self.evals.to_meta(step),
        }
        return Snapshot(step=step, data_step=data_step, shared=host_copy(tensors), meta=meta)

    def restore(self, snap: Snapshot) -> None:
        """Reinstate the state captured by `snapshot` (every rank, from the same snapshot)."""
        load_trainable(self.model, snap.shared)
        self.optimizer.load_state_dict(optimizer_state(snap.shared, snap.meta["optimizer"]))
        self.scheduler.load_state_dict(snap.meta["scheduler"])
        if snap.meta.get("scaler"):
            self.scaler.load_state_dict(snap.meta["scaler"])
        self.evals = EvalState.from_meta(snap.meta.get("evals"))


def deterministic(device: torch.device) -> None:
    """What bit-exact resume needs of CUDA (CPU kernels are deterministic already): deterministic
    kernels, no cuDNN autotuning, and a fixed cuBLAS workspace (read when cuBLAS first starts)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)
