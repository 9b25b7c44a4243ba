"""The optimizer a rank trains with: AdamW over the adapter, or LoRA+'s parameter groups.

Contract: `build_optimizer(model, params, train)` returns AdamW (lr = `train.lr`, weight decay
0.01, torch's default) over `params`; with `train.loraplus_lr_ratio` > 0 it returns peft's LoRA+
groups instead: LoRA's B matrices and 1-d vectors such as DoRA's magnitudes at lr x ratio, LoRA on
embeddings and the A matrices at lr; weight decay 0.01 but on biases and norms (peft's rule). The
same model gives the same groups in the same order, so a saved optimizer state dict
(`checkpoint.snapshot.optimizer_parts`) restores into it exactly, at any world size.
"""

from __future__ import annotations

import torch

from resilient.config import TrainConfig

WEIGHT_DECAY = 0.01  # AdamW's default; given to LoRA+'s groups too, whose peft default is 0


def build_optimizer(
    model: torch.nn.Module, params: list[torch.nn.Parameter], train: TrainConfig
) -> torch.optim.Optimizer:
    if not train.loraplus_lr_ratio:
        return torch.optim.AdamW(params, lr=train.lr, weight_decay=WEIGHT_DECAY)
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=train.lr,
        loraplus_lr_ratio=train.loraplus_lr_ratio,
        loraplus_weight_decay=WEIGHT_DECAY,
        # peft's default (1e-6) would all but freeze LoRA on embeddings without saying so.
        loraplus_lr_embedding=train.lr,
    )
