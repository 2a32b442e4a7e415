"""Several methods on one backbone and task with equal step budgets: the demo's comparison table.

Each row: the test metrics, trainable parameters, the access level used, the
median training-step time, and the peak tensor memory of one training step
(torch profiler; the backbone's weights, resident for every method, excluded).

Example:
    >>> rows = compare("bridge:efficientnet-lite0+minilm", "tuxpaint", ["zero-shot", "dga"], steps=40)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from graytune.data.catalog import load_splits
from graytune.eval.profiling import peak_tensor_mb
from graytune.errors import InvalidInputError
from graytune.methods import MethodKind, get_method
from graytune.model import AdaptedModel
from graytune.recipes.run import Opened, make_task, open_for, run_once
from graytune.train.config import TrainConfig
from graytune.train.loop import seed_everything
from graytune.train.tasks import Task

log = logging.getLogger(__name__)


def step_peak_mb(model: AdaptedModel, task: Task, batch_size: int) -> float:
    """Peak tensor memory (MB) of one AdamW step of ``model`` on ``task``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    batch = next(task.batches(batch_size, torch.Generator().manual_seed(0)))

    def step() -> None:
        task.loss(model, batch).backward()
        opt.step()

    return peak_tensor_mb(step)


def compare(backbone: str, data: str, methods: Sequence[str], steps: int, seed: int = 0,
            image_size: int | None = None, batch_size: int = 32, progress: bool = True) -> list[dict[str, Any]]:
    """Train each method for ``steps`` steps (same seed, data, batches) and test it once."""
    splits = load_splits(data)
    rows = []
    task = None
    for name in methods:
        if get_method(name).kind is MethodKind.LOGIT:
            raise InvalidInputError(f"compare trains methods with graytune train; {name!r} is made by "
                                    f"{get_method(name).trained_by}")
    for method in methods:
        seed_everything(seed)
        spec = get_method(method)
        handle = open_for(backbone, None, method)  # each method at its own level, with its own grants
        task = task or make_task(splits, handle, image_size)
        peak = step_peak_mb(AdaptedModel.build(handle, method), task, batch_size) if spec.slots else 0.0
        # the registry's learning rates: chosen once, before the results runs, for every task
        config = TrainConfig(lr=spec.lr, max_steps=steps, batch_size=batch_size, seed=seed)
        run, _ = run_once(Opened(handle, task, splits.val, splits.test), method, config, progress=progress,
                          score_val=True)
        row = {"method": method, "access": spec.min_access.label, "peak_mb": peak, "steps": run["steps"],
               "step_seconds": run["step_seconds"], "best_val": run["best_val"],
               "trainable_parameters": run["trainable_parameters"], "test": run["test"]}
        if spec.slots:
            row["lr"] = config.lr
        log.info("%s: %s", method, row["test"])
        rows.append(row)
    return rows
