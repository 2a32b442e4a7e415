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
from graytune.model import METHODS, AdaptedModel
from graytune.train.recipe import make_task, open_for
from graytune.train.tasks import Task
from graytune.train.trainer import TrainConfig, fit, seed_everything
from graytune.types import AccessLevel

log = logging.getLogger(__name__)

#: Per-method learning rates (AdamW): adapters take large steps, whole-model tuning small ones.
#: Chosen once, before the results runs, and used for every task (no per-task tuning, no test-set peeking).
DEFAULT_LR = {"output": 1e-3, "output-mlp": 1e-3, "dga": 3e-3, "lga": 3e-3, "adalink": 3e-3, "lora": 1e-3,
              "full": 3e-5}


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
    for method in methods:
        seed_everything(seed)
        level = max(METHODS[method].min_access, AccessLevel.BLACK_BOX)
        handle = open_for(backbone, level.label, method)
        task = task or make_task(splits, handle, image_size)
        row: dict[str, Any] = {"method": method, "access": level.label}
        if METHODS[method].adapters or METHODS[method].whitebox:
            row["peak_mb"] = step_peak_mb(AdaptedModel.build(handle, method), task, batch_size)
            seed_everything(seed)
            model = AdaptedModel.build(handle, method)
            config = TrainConfig(lr=DEFAULT_LR.get(method, 1e-3), max_steps=steps, batch_size=batch_size, seed=seed)
            result = fit(model, task, splits.val, config, progress=progress)
            row.update(steps=result.steps, step_seconds=result.step_seconds, best_val=result.best_metric,
                       lr=config.lr)
        else:
            model = AdaptedModel.build(handle, method)
            row.update(steps=0, step_seconds=0.0, peak_mb=0.0, best_val=task.evaluate(model, splits.val)[task.primary])
        row["trainable_parameters"] = model.trainable_parameters() if row["steps"] else 0
        row["test"] = task.evaluate(model, splits.test)
        log.info("%s: %s", method, row["test"])
        rows.append(row)
    return rows
