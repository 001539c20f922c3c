"""Optimiser and learning-rate schedule shared by the trainers."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float, min_lr_ratio: float
) -> LambdaLR:
    """Linear warm-up from ~0 over ``warmup_fraction`` of ``total_steps``, then cosine decay to
    ``min_lr_ratio`` × the base rate; stepped once per optimiser step.

    One ``LambdaLR`` whatever the numbers, so a run resumed with a larger ``max_steps`` restores the same scheduler
    and continues on the schedule of the new length.
    """
    total = max(1, total_steps)
    warmup = min(total - 1, round(warmup_fraction * total))

    def factor(step: int) -> float:
        if step < warmup:
            return 1e-3 + (1 - 1e-3) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
