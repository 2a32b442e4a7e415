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

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graytune.artifact_files import replace_atomically
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.model import AdaptedModel
from graytune.schedules import adamw_warmup_cosine
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
    checkpoint_every: str = "10m"
    """Also checkpoint every N steps (``50``) or every N minutes (``10m``); Ctrl-C checkpoints too."""

    def __post_init__(self) -> None:
        errors = [problem for name in LIMITS if (problem := limit_problem(name, getattr(self, name)))]
        try:
            checkpoint_cadence(self.checkpoint_every)
        except InvalidInputError as err:
            errors.append(str(err))
        if errors:
            raise InvalidInputError("training settings refused: " + "; ".join(errors))


def checkpoint_cadence(text: str) -> tuple[int, float]:
    """``(steps, seconds)`` between checkpoints from ``"50"`` (steps) or ``"10m"``/``"30s"`` (time)."""
    value = str(text).strip().lower()
    try:
        if value.endswith(("m", "s")):
            amount = float(value[:-1])
            if amount > 0:
                return 0, amount * (60.0 if value.endswith("m") else 1.0)
        elif int(value) > 0:
            return int(value), 0.0
    except ValueError:
        pass
    raise InvalidInputError(f"checkpoint_every must be a number of steps (50) or of minutes (10m) or seconds "
                            f"(30s), above 0; got {text!r}")


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
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, tensorboard: bool = False,
        ) -> FitResult:
    """Train ``model``'s trainable tensors on ``task``; returns with the best validated state loaded.

    With ``checkpoint`` (a path), an atomic checkpoint is written at every validation, every
    ``config.checkpoint_every`` and on Ctrl-C, and a run that finds one resumes from it exactly;
    every step and validation is appended to ``history.jsonl`` beside it (and, with ``tensorboard``,
    written as TensorBoard events in ``tensorboard/`` there too).
    """
    if config.lr is None:
        raise InvalidInputError("TrainConfig.lr is None: give a learning rate (graytune methods lists each "
                                "method's default)")
    params = _trainable(model)
    if not params:
        raise InvalidInputError(f"method {model.method!r} has nothing to train; evaluate it instead")
    seed_everything(config.seed)
    rank, world = world_position()
    opt, sched = adamw_warmup_cosine(params.values(), config.lr, config.weight_decay, config.max_steps, config.warmup)
    per_epoch = len(task) // (config.batch_size * world * config.grad_accum)
    if per_epoch < 1:
        raise InvalidInputError(f"the training set has {len(task)} samples, fewer than one step's "
                                f"{config.batch_size * world * config.grad_accum}; lower --batch-size or add data")
    eval_every = config.eval_every or per_epoch
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -math.inf, "best_step": 0, "bad": 0,
             "history": [], "best_state": None}
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = _resume(ckpt, model, opt, sched, config)
        log.info("resumed from %s at step %d", ckpt, state["step"])
    history = History(ckpt.parent / HISTORY_NAME if ckpt is not None and rank == 0 else None,
                      tensorboard=tensorboard and rank == 0)
    ckpt_write = ckpt if rank == 0 else None  # rank 0 writes the run's files; every rank resumes from them
    every_steps, every_seconds = checkpoint_cadence(config.checkpoint_every)
    start, step_time, last_save = time.perf_counter(), [], time.monotonic()
    bar = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {model.method}", unit="step",
               disable=not progress or rank != 0)
    stop, rng = False, torch.get_rng_state()
    try:
        while state["step"] < config.max_steps and not stop:
            for group in _epoch_groups(task, config, state):
                t0, rng = time.perf_counter(), torch.get_rng_state()
                opt.zero_grad(set_to_none=True)
                loss_value = 0.0
                for batch in group:
                    loss = task.loss(model, batch) / config.grad_accum
                    loss.backward()
                    loss_value += float(loss.detach())
                if world > 1:
                    loss_value = _average_gradients(params, loss_value, world)
                lr = opt.param_groups[0]["lr"]  # the rate this step used
                opt.step()
                sched.step()
                step_time.append(time.perf_counter() - t0)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                history.step(model, state, loss_value, lr, step_time[-1],
                             config.batch_size * world * config.grad_accum, time.perf_counter() - start)
                due = (every_steps and state["step"] % every_steps == 0) or (
                    every_seconds and time.monotonic() - last_save >= every_seconds)
                if state["step"] % eval_every == 0 or state["step"] == config.max_steps:
                    stop = _validate(model, task, val_data, config, state, loss_value, history, bar)
                    due = True
                if ckpt_write is not None and due:
                    _save(ckpt_write, model, opt, sched, state, config)
                    last_save = time.monotonic()
                if stop or state["step"] >= config.max_steps:
                    break
            else:  # the epoch ran out of batches
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        if ckpt_write is not None:  # the last whole step is kept: run the same command again to resume from it
            _save(ckpt_write, model, opt, sched, state, config, rng=rng)
            bar.write(f"interrupted at step {state['step']}; checkpoint saved to {ckpt}: run the same command "
                      "again to resume", file=sys.stderr)
        raise
    finally:
        bar.close()
        history.close()
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"], strict=False)
    median = float(np.median(step_time)) if step_time else 0.0
    return FitResult(state["step"], state["best"], state["best_step"], state["history"],
                     time.perf_counter() - start, median)


HISTORY_NAME = "history.jsonl"


class History:
    """``history.jsonl``: one JSON object per logged step and per validation, appended (a resumed run continues it).

    Lines: ``{"event": "step", "step", "epoch", "loss", "lr", "step_seconds", "samples_per_s",
    "forward_queries", "gradient_queries", "time_s"}`` and ``{"event": "val", "step", "metrics", "primary",
    "best"}``; metrics on a 0–1 scale.
    """

    def __init__(self, path: Path | None, tensorboard: bool = False) -> None:
        self.path, self.board = path, None
        if tensorboard and path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MissingDependencyError("--log tensorboard needs the tensorboard package: "
                                             "pip install 'graytune[tensorboard]'") from None
            self.board = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        if self.board is not None:
            step = record["step"]
            if record["event"] == "step":
                for key in ("loss", "lr", "samples_per_s", "forward_queries", "gradient_queries"):
                    self.board.add_scalar(f"train/{key}", record[key], step)
            else:
                for key, value in record["metrics"].items():
                    self.board.add_scalar(f"val/{key}", value, step)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def step(self, model: AdaptedModel, state: dict[str, Any], loss: float, lr: float, seconds: float,
             samples: int, elapsed: float) -> None:
        exposure = model.handle.exposure
        self.write({"event": "step", "step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr,
                    "step_seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else 0.0,
                    "forward_queries": exposure.forward_queries, "gradient_queries": exposure.gradient_queries,
                    "time_s": elapsed})


def world_position() -> tuple[int, int]:
    """``(rank, world size)`` of this process: ``(0, 1)`` unless a torch.distributed group is running."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params: dict[str, torch.Tensor], loss: float, world: int) -> float:
    """Average every trainable tensor's gradient (and the logged loss) over the data-parallel ranks.

    Each rank's loss is the mean over its share of the global batch, so the average equals one
    process's gradient on the whole batch (for losses that are means over samples).
    """
    import torch.distributed as dist

    for p in params.values():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)
    total = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total) / world


def _epoch_groups(task: Task, config: TrainConfig, state: dict[str, Any]) -> Any:
    """This epoch's groups of ``grad_accum`` batches, from where a resumed run left off.

    Every rank draws the same global order and takes its share of each batch.
    """
    gen = torch.Generator().manual_seed(config.seed * 100_003 + state["epoch"])
    rank, world = world_position()
    batches = (task.batches(config.batch_size * world, gen, (rank, world)) if world > 1
               else task.batches(config.batch_size, gen))
    for _ in range(state["batch_in_epoch"] * config.grad_accum):
        next(batches, None)
    while True:
        group = [b for b in (next(batches, None) for _ in range(config.grad_accum)) if b is not None]
        if len(group) < config.grad_accum:
            return
        yield group


def _validate(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig, state: dict[str, Any],
              loss: float, history: History, bar: Any) -> bool:
    metrics = task.evaluate(model, val_data)
    value = metrics[task.primary]
    state["history"].append({"step": state["step"], "loss": loss, **{f"val_{k}": v for k, v in metrics.items()}})
    best = value > state["best"]
    history.write({"event": "val", "step": state["step"], "metrics": metrics, "primary": task.primary,
                   "best": best})
    log.info("step %d: val %s = %.3f", state["step"], task.primary, value)
    if not bar.disable:  # shown with the progress bar, on stderr
        bar.write(f"step {state['step']}: val {task.primary} {value:.4f}" + (" (best so far)" if best else ""),
                  file=sys.stderr)
    if best:
        state.update(best=value, best_step=state["step"], bad=0,
                     best_state={k: v.detach().clone() for k, v in _trainable(model).items()})
    else:
        state["bad"] += 1
    return bool(config.patience and state["bad"] >= config.patience)


def _save(path: Path, model: AdaptedModel, opt: Any, sched: Any, state: dict[str, Any], config: TrainConfig,
          rng: torch.Tensor | None = None) -> None:
    payload = {
        "trainable": {k: v.detach().clone() for k, v in _trainable(model).items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": torch.get_rng_state() if rng is None else rng,
        "state": state,
        "config": _resumable(config),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: a reader sees the old checkpoint or the new one, never half
    replace_atomically(path, lambda tmp: torch.save(payload, tmp))


def _resumable(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (cadence may change)."""
    return {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}


def _resume(path: Path, model: AdaptedModel, opt: Any, sched: Any, config: TrainConfig) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise InvalidInputError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: "
                                f"{str(err)[:120]}); delete it to start the run over (the adapter of a finished "
                                "run is not in it)") from None
    trainable = _trainable(model)
    if set(payload["trainable"]) != set(trainable):
        raise InvalidInputError(f"checkpoint {path} belongs to another method or backbone; delete it or use "
                                "another --out")
    saved = payload.get("config")
    if saved is not None and saved != _resumable(config):
        diff = {k: (saved.get(k), v) for k, v in _resumable(config).items() if saved.get(k) != v}
        raise InvalidInputError(f"checkpoint {path} was written with other settings: "
                                + ", ".join(f"{k} {a} then, {b} now" for k, (a, b) in diff.items())
                                + "; run with the same flags to resume, or delete the checkpoint to start over")
    model.load_state_dict(payload["trainable"], strict=False)
    opt.load_state_dict(payload["optimizer"])
    sched.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"])
    return payload["state"]
