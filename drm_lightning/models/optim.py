"""The optimiser of an expert fit: AdamW without decay on biases and norms, linear warmup then linear decay."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def adamw_warmup_decay(
    parameters: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    warmup_ratio: float,
    total_steps: int | float,
) -> dict[str, Any]:
    """``configure_optimizers``' answer: AdamW over the trainable ``parameters`` (matrices decay, biases and norms
    do not) with ``linear_warmup_decay`` over ``total_steps``, stepped per batch."""
    decay, no_decay = [], []
    for param in parameters:
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate)
    total = max(1, int(total_steps))
    warmup = int(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: linear_warmup_decay(step, warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: ``(step + 1) / (warmup + 1)`` while warming up, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return max(0.0, (total - step) / max(1, total - warmup))
