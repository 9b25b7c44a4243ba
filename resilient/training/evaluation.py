"""Evaluation on the held-out set, and the early-stopping state it feeds.

Contract: `evaluate(trainer, step)` runs the trainer's model (in eval mode, no gradient, no random
draw) over the first `eval.max_batches` microbatches of the staged evaluation set (all when 0),
each rank a share (`data.share`), and sums job-wide with one all-reduce: every rank returns the
same `{step, loss, perplexity, accuracy, tokens}` (token-weighted over the tokens that carry loss;
accuracy: the share whose most likely next token is the label). `EvalState` is what early stopping
remembers (best loss and its step, evaluations since an improvement, the reason to stop once
`eval.early_stop_patience` is spent); it travels in every snapshot (`to_meta`, `from_meta`), so a
resumed job stops where an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from resilient.training.data import share
from resilient.training.rows import IGNORE


def evaluate(trainer, step: int) -> dict:
    spec, table = trainer.spec, trainer.data.eval
    micro = spec.train.batch_size
    count = math.ceil(len(table) / micro)
    if spec.eval.max_batches:
        count = min(count, spec.eval.max_batches)
    sums = torch.zeros(3, dtype=torch.float64, device=trainer.device)
    amp = trainer.amp_dtype
    with torch.no_grad():
        for b in share(count, trainer.rank, trainer.world):
            indices = list(range(b * micro, min(len(table), (b + 1) * micro)))
            batch = {k: v.to(trainer.device) for k, v in trainer.data.batch(table, indices).items()}
            labels = batch.pop("labels")[:, 1:]
            with torch.autocast(trainer.device.type, dtype=amp, enabled=amp is not None):
                logits = trainer.model(**batch).logits[:, :-1].float()
            mask = labels != IGNORE
            ce = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=IGNORE,
                reduction="sum",
            )
            right = ((logits.argmax(-1) == labels) & mask).sum()
            sums += torch.stack([ce.double(), mask.sum().double(), right.double()])
    dist.all_reduce(sums)
    tokens = max(1.0, float(sums[1]))
    loss = float(sums[0]) / tokens
    return {
        "step": step,
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "accuracy": float(sums[2]) / tokens,
        "tokens": int(sums[1]),
    }


@dataclass
class EvalState:
    best: float | None = None
    best_step: int | None = None
    since: int = 0  # evaluations since the best
    stop: str | None = None  # why training ends early, once patience is spent
    last: dict | None = None  # the newest evaluation's metrics

    def observe(self, step: int, metrics: dict, cfg) -> None:
        self.last = metrics
        loss = metrics["loss"]
        if self.best is None or loss < self.best - cfg.early_stop_min_delta:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        if cfg.early_stop_patience and self.since >= cfg.early_stop_patience and not self.stop:
            self.stop = (
                f"early stop at step {step}: eval loss has not improved for {self.since} "
                f"evaluations (best {self.best:.4f} at step {self.best_step})"
            )

    def to_meta(self, step: int) -> dict:
        """The state after `step`; `eval` holds that step's metrics when it was evaluated."""
        meta = asdict(self)
        last = meta.pop("last")
        meta["eval"] = last if last and last.get("step") == step else None
        return meta

    @classmethod
    def from_meta(cls, meta: dict | None) -> EvalState:
        if not meta:
            return cls()
        keep = {k: meta.get(k) for k in ("best", "best_step", "stop")}
        return cls(**keep, since=meta.get("since", 0), last=meta.get("eval"))
