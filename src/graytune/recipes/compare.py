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
from graytune.train.recipe import make_task, open_for
from graytune.train.tasks import Task
from graytune.train.trainer import TrainConfig, fit, seed_everything

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
        row: dict[str, Any] = {"method": method, "access": spec.min_access.label}
        if spec.slots:
            row["peak_mb"] = step_peak_mb(AdaptedModel.build(handle, method), task, batch_size)
            seed_everything(seed)
            model = AdaptedModel.build(handle, method)
            # the registry's learning rates: chosen once, before the results runs, for every task
            config = TrainConfig(lr=spec.lr, max_steps=steps, batch_size=batch_size, seed=seed)
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
