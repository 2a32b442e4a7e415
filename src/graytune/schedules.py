"""Learning-rate schedules shared by the trainers.

Example:
    >>> torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total=100, warmup=0.05))
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any


def warmup_cosine(step: int, total: int, warmup: float) -> float:
    """LR factor: linear warm-up over ``warmup`` × ``total`` steps, then cosine decay to zero at ``total``."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw_warmup_cosine(params: Iterable[Any], lr: float, weight_decay: float, total: int, warmup: float,
                        ) -> tuple[Any, Any]:
    """``(AdamW, its LambdaLR)``: the one optimiser and schedule every graytune trainer uses.

    Example:
        >>> opt, sched = adamw_warmup_cosine(model.parameters(), lr=3e-3, weight_decay=0.0, total=100, warmup=0.05)
    """
    import torch

    opt = torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warmup))
