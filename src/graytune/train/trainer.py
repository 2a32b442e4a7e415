"""The trainer: AdamW, warm-up then cosine, accumulation, early stopping on validation, exact resume.

Every ``eval_every`` optimizer steps (default: once per epoch) it evaluates on
the validation set (never the test set), keeps the best adapter state, and
writes an atomic checkpoint (trainable tensors, optimizer, scheduler, RNG,
position in the epoch), so an interrupted run resumes where it stopped and
ends with the same adapter as an uninterrupted one.

Example:
    >>> result = fit(model, task, val_data, TrainConfig(max_steps=100), checkpoint="out/ckpt.pt")
    >>> result.best_metric, result.steps
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graytune.errors import InvalidInputError
from graytune.model import AdaptedModel
from graytune.schedules import warmup_cosine
from graytune.train.tasks import Task

log = logging.getLogger(__name__)


#: What each field of ``TrainConfig`` accepts: (lowest, whether the lowest is allowed, highest or None).
LIMITS: dict[str, tuple[float, bool, float | None]] = {
    "lr": (0.0, True, None), "weight_decay": (0.0, True, None), "batch_size": (1, True, None),
    "grad_accum": (1, True, None), "max_steps": (1, True, None), "warmup": (0.0, True, 1.0),
    "eval_every": (0, True, None), "patience": (0, True, None), "seed": (0, True, None),
}


@dataclass
class TrainConfig:
    """How to train; every field is written into the artifact. Bad values are refused all at once."""

    lr: float | None = None
    """Peak learning rate of AdamW; None: the method's default (graytune methods lists it)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 32
    """Samples per forward; an optimizer step sees ``batch_size * grad_accum``."""
    grad_accum: int = 1
    """Forwards accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps in all."""
    warmup: float = 0.05
    """Fraction of ``max_steps`` with a linear warm-up (0 <= warmup < 1), then cosine decay to zero."""
    eval_every: int = 0
    """Validate every this many steps; 0 means once per epoch."""
    patience: int = 0
    """Stop after this many validations without improvement; 0 never stops early."""
    seed: int = 0
    """Seed of the data order and of every random draw."""

    def __post_init__(self) -> None:
        errors = [problem for name in LIMITS if (problem := limit_problem(name, getattr(self, name)))]
        if errors:
            raise InvalidInputError("training settings refused: " + "; ".join(errors))


def limit_problem(name: str, value: float | None) -> str:
    """Why ``value`` is not allowed for the ``TrainConfig`` field ``name`` ("" when it is)."""
    if value is None and name == "lr":
        return ""
    low, low_ok, high = LIMITS[name]
    if value is None or value < low or (value == low and not low_ok) or (high is not None and value >= high):
        allowed = (f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else ""))
        return f"{name} must be {allowed}; got {value}"
    return ""


@dataclass
class FitResult:
    steps: int
    best_metric: float
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _trainable(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fit(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig,
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True) -> FitResult:
    """Train ``model``'s trainable tensors on ``task``; returns with the best validated state loaded."""
    if config.lr is None:
        raise InvalidInputError("TrainConfig.lr is None: give a learning rate (graytune methods lists each "
                                "method's default)")
    params = _trainable(model)
    if not params:
        raise InvalidInputError(f"method {model.method!r} has nothing to train; evaluate it instead")
    seed_everything(config.seed)
    opt = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, config.max_steps, config.warmup))
    per_epoch = len(task) // (config.batch_size * config.grad_accum)
    if per_epoch < 1:
        raise InvalidInputError(f"the training set has {len(task)} samples, fewer than one step's "
                                f"{config.batch_size * config.grad_accum}; lower --batch-size or add data")
    eval_every = config.eval_every or per_epoch
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -math.inf, "best_step": 0, "bad": 0,
             "history": [], "best_state": None}
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = _resume(ckpt, model, opt, sched, config)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    start, step_time = time.perf_counter(), []
    bar = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {model.method}", unit="step",
               disable=not progress)
    stop = False
    while state["step"] < config.max_steps and not stop:
        for group in _epoch_groups(task, config, state):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_value = 0.0
            for batch in group:
                loss = task.loss(model, batch) / config.grad_accum
                loss.backward()
                loss_value += float(loss.detach())
            opt.step()
            sched.step()
            step_time.append(time.perf_counter() - t0)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if state["step"] % eval_every == 0 or state["step"] == config.max_steps:
                stop = _validate(model, task, val_data, config, state, loss_value)
                if ckpt is not None:
                    _save(ckpt, model, opt, sched, state)
            if stop or state["step"] >= config.max_steps:
                break
        else:  # the epoch ran out of batches
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"], strict=False)
    median = float(np.median(step_time)) if step_time else 0.0
    return FitResult(state["step"], state["best"], state["best_step"], state["history"],
                     time.perf_counter() - start, median)


def _epoch_groups(task: Task, config: TrainConfig, state: dict[str, Any]) -> Any:
    """This epoch's groups of ``grad_accum`` batches, from where a resumed run left off."""
    gen = torch.Generator().manual_seed(config.seed * 100_003 + state["epoch"])
    batches = task.batches(config.batch_size, gen)
    for _ in range(state["batch_in_epoch"] * config.grad_accum):
        next(batches, None)
    while True:
        group = [b for b in (next(batches, None) for _ in range(config.grad_accum)) if b is not None]
        if len(group) < config.grad_accum:
            return
        yield group


def _validate(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig, state: dict[str, Any],
              loss: float) -> bool:
    metrics = task.evaluate(model, val_data)
    value = metrics[task.primary]
    state["history"].append({"step": state["step"], "loss": loss, **{f"val_{k}": v for k, v in metrics.items()}})
    log.info("step %d: val %s = %.3f", state["step"], task.primary, value)
    if value > state["best"]:
        state.update(best=value, best_step=state["step"], bad=0,
                     best_state={k: v.detach().clone() for k, v in _trainable(model).items()})
    else:
        state["bad"] += 1
    return bool(config.patience and state["bad"] >= config.patience)


def _save(path: Path, model: AdaptedModel, opt: Any, sched: Any, state: dict[str, Any]) -> None:
    payload = {
        "trainable": {k: v.detach().clone() for k, v in _trainable(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state(),
        "state": state,
    }
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, tmp)
    os.replace(tmp, path)  # atomic: a reader sees the old checkpoint or the new one, never half


def _resume(path: Path, model: AdaptedModel, opt: Any, sched: Any, config: TrainConfig) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    trainable = _trainable(model)
    if set(payload["trainable"]) != set(trainable):
        raise InvalidInputError(f"checkpoint {path} belongs to another method or backbone; delete it or use "
                                "another --out")
    model.load_state_dict(payload["trainable"], strict=False)
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return payload["state"]
