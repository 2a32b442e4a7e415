"""The trainer: AdamW, warm-up then cosine, accumulation, early stopping on validation, exact resume.

Every ``eval_every`` optimizer steps (default: once per epoch) it evaluates on
the validation set (never the test set), keeps the best adapter state, and
writes an atomic checkpoint (trainable tensors, optimizer, scheduler, RNG,
position in the epoch), so an interrupted run resumes where it stopped and
ends with the same adapter as an uninterrupted one.

Adapters that train zeroth-order (``dga-zo``, ``prompt-zo``) get gradient estimates from
forward calls alone (``graytune.train.zeroth``), stepped by the same optimizer. Forward calls
through the boundary are counted the way black-box tuning papers count them (one batched
forward = one call) and in samples, for training and validation apart; ``max_calls`` stops
training before a step would pass that many training calls.

Example:
    >>> result = fit(model, task, val_data, TrainConfig(max_steps=100), checkpoint="out/ckpt.pt")
    >>> result.best_metric, result.steps, result.calls["train"]
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graytune.adapters import zo_parameters
from graytune.artifact_files import replace_atomically
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.model import AdaptedModel
from graytune.schedules import adamw_warmup_cosine
from graytune.train.tasks import Task
from graytune.train.zeroth import (
    ZO_FIELDS, BudgetSpent, MeteredHandle, ZerothOrder, ZOSettings, settings_problems,
)

log = logging.getLogger(__name__)


#: What each field of ``TrainConfig`` accepts: (lowest, whether the lowest is allowed, highest or None).
LIMITS: dict[str, tuple[float, bool, float | None]] = {
    "lr": (0.0, True, None), "weight_decay": (0.0, True, None), "batch_size": (1, True, None),
    "grad_accum": (1, True, None), "max_steps": (1, True, None), "warmup": (0.0, True, 1.0),
    "eval_every": (0, True, None), "patience": (0, True, None), "seed": (0, True, None),
    "max_calls": (0, True, None), "zo_q": (1, True, None), "zo_eps": (0.0, False, None), "zo_dim": (1, True, None),
    "zo_momentum": (0.0, True, 1.0),
}
#: Fields whose None means "the default of the method (lr) or of the estimator (zo_*)".
OPTIONAL = {"lr", *ZO_FIELDS}


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
    max_calls: int = 0
    """Stop before a training step would take the forward calls through the boundary past this many
    (one batched forward = one call, as BlackVIP and ZIP count; validation calls are counted apart); 0: no limit."""
    zo: str | None = None
    """Zeroth-order estimator, for methods whose input adapters train from forward calls alone (dga-zo,
    prompt-zo): spsa, spsa-gc (BlackVIP's, the default), zip (ZIP's clipped SPSA in a low-rank intrinsic space)
    or mezo (MeZO's two-point Gaussian)."""
    zo_q: int | None = None
    """Zeroth-order: perturbation directions per step, two loss evaluations each (default 5; mezo 1)."""
    zo_eps: float | None = None
    """Zeroth-order: perturbation scale (default 0.01; mezo 0.001)."""
    zo_dim: int | None = None
    """--zo zip: dimension of the intrinsic vector projected onto the adapter tensors (default 256)."""
    zo_momentum: float | None = None
    """--zo spsa-gc: momentum of the gradient correction (default 0.9)."""

    def __post_init__(self) -> None:
        errors = [problem for name in LIMITS if (problem := limit_problem(name, getattr(self, name)))]
        if self.zo is not None or self.zo_dim is not None or self.zo_momentum is not None:
            errors += settings_problems(self.zo, self.zo_dim, self.zo_momentum)
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
    if value is None and name in OPTIONAL:
        return ""
    low, low_ok, high = LIMITS[name]
    if value is None or value < low or (value == low and not low_ok) or (high is not None and value >= high):
        allowed = (f"{'>=' if low_ok else '>'} {low:g}" + (f" and < {high:g}" if high is not None else ""))
        return f"{name} must be {allowed}; got {value}"
    return ""


@dataclass
class FitResult:
    """What ``fit`` did.

    Attributes:
        calls: forward calls through the boundary and samples sent: ``train``, ``train_samples``, ``val``,
            ``val_samples``, and ``step`` (the calls of the last training step).
        stopped: why training ended: ``max_steps``, ``patience`` or ``max_calls``.
    """

    steps: int
    best_metric: float
    best_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    step_seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    stopped: str = "max_steps"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _trainable(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _tunable(model: AdaptedModel, zo: ZerothOrder | None) -> dict[str, torch.Tensor]:
    """What training changes: the tensors that get gradients and the zeroth-order ones (checkpoints, best state)."""
    return {**_trainable(model), **(dict(zip(zo.names, zo.params)) if zo is not None else {})}


def zeroth_order_for(model: AdaptedModel, config: TrainConfig) -> ZerothOrder | None:
    """The estimator for ``model``'s zeroth-order adapters (None without any); the zo settings refused otherwise."""
    params = zo_parameters(model)
    given = [name for name in ZO_FIELDS if getattr(config, name) is not None]
    if not params:
        if given:
            raise InvalidInputError(f"{', '.join(given)} set zeroth-order training, but method {model.method!r} has "
                                    "no adapter trained zeroth-order; use dga-zo or prompt-zo (graytune methods "
                                    "marks them) or drop those settings")
        return None
    if world_position()[1] > 1:
        raise InvalidInputError("zeroth-order training runs in one process; its calls are batched already: "
                                "run graytune train instead of the data-parallel entry point")
    settings = ZOSettings.resolve(*(getattr(config, name) for name in ZO_FIELDS))
    return ZerothOrder(params, settings, seed=config.seed)


def fit(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig,
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, tensorboard: bool = False,
        ) -> FitResult:
    """Train ``model``'s trainable tensors on ``task``; returns with the best validated state loaded.

    With ``checkpoint`` (a path), an atomic checkpoint is written at every validation, every
    ``config.checkpoint_every`` and on Ctrl-C, and a run that finds one resumes from it exactly;
    every step and validation is appended to ``history.jsonl`` beside it (and, with ``tensorboard``,
    written as TensorBoard events in ``tensorboard/`` there too).

    Raises:
        InvalidInputError: no learning rate, nothing to train, zeroth-order settings for a model without
            zeroth-order adapters, or ``max_calls`` below the calls of one training step.
    """
    if config.lr is None:
        raise InvalidInputError("TrainConfig.lr is None: give a learning rate (graytune methods lists each "
                                "method's default)")
    rank, world = world_position()
    if config.max_calls and world > 1:
        raise InvalidInputError("max_calls counts the calls of one process; run graytune train, not the "
                                "data-parallel entry point, to train within a budget of calls")
    zo = zeroth_order_for(model, config)
    params = {**_trainable(model), **(zo.variables() if zo is not None else {})}
    if not params:
        raise InvalidInputError(f"method {model.method!r} has nothing to train; evaluate it instead")
    seed_everything(config.seed)
    opt, sched = adamw_warmup_cosine(params.values(), config.lr, config.weight_decay, config.max_steps, config.warmup)
    per_epoch = len(task) // (config.batch_size * world * config.grad_accum)
    if per_epoch < 1:
        raise InvalidInputError(f"the training set has {len(task)} samples, fewer than one step's "
                                f"{config.batch_size * world * config.grad_accum}; lower --batch-size or add data")
    eval_every = config.eval_every or per_epoch
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -math.inf, "best_step": 0, "bad": 0,
             "history": [], "best_state": None, "calls": dict.fromkeys(CALL_KEYS, 0), "stopped": "max_steps"}
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt is not None and ckpt.is_file():
        state = {"calls": dict.fromkeys(CALL_KEYS, 0), "stopped": "max_steps",
                 **_resume(ckpt, model, opt, sched, config, zo)}
        log.info("resumed from %s at step %d", ckpt, state["step"])
    history = History(ckpt.parent / HISTORY_NAME if ckpt is not None and rank == 0 else None,
                      tensorboard=tensorboard and rank == 0)
    ckpt_write = ckpt if rank == 0 else None  # rank 0 writes the run's files; every rank resumes from them
    every_steps, every_seconds = checkpoint_cadence(config.checkpoint_every)
    start, step_time, last_save = time.perf_counter(), [], time.monotonic()
    bar = tqdm(total=config.max_steps, initial=state["step"], desc=f"train {model.method}", unit="step",
               disable=not progress or rank != 0)
    stop, rng, last_loss = not _affordable(config, state["calls"]), torch.get_rng_state(), 0.0
    if stop:  # a resumed run whose budget is spent
        state["stopped"] = "max_calls"
    try:
        while state["step"] < config.max_steps and not stop:
            for group in _epoch_groups(task, config, state):
                t0, rng = time.perf_counter(), torch.get_rng_state()
                opt.zero_grad(set_to_none=True)
                try:
                    loss_value = _gradients(model, task, group, config, zo, state)
                except BudgetSpent:
                    stop = _out_of_budget(model, task, val_data, config, state, opt, zo, history, bar, last_loss)
                    break
                if world > 1:
                    loss_value = _average_gradients(params, loss_value, world)
                last_loss = loss_value
                lr = opt.param_groups[0]["lr"]  # the rate this step used
                opt.step()
                sched.step()
                if zo is not None:
                    zo.after_step()
                step_time.append(time.perf_counter() - t0)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", calls=state["calls"]["train"])
                history.step(model, state, loss_value, lr, step_time[-1],
                             config.batch_size * world * config.grad_accum, time.perf_counter() - start)
                due = (every_steps and state["step"] % every_steps == 0) or (
                    every_seconds and time.monotonic() - last_save >= every_seconds)
                spent = not _affordable(config, state["calls"])
                if state["step"] % eval_every == 0 or state["step"] == config.max_steps or spent:
                    stop = _validate(model, task, val_data, config, state, loss_value, history, bar, zo)
                    due = True
                if spent:
                    state["stopped"], stop = "max_calls", True
                    log.info("the next step would pass max_calls=%d (%d training calls spent, %d a step); stopping",
                             config.max_calls, state["calls"]["train"], state["calls"]["step"])
                if ckpt_write is not None and due:
                    _save(ckpt_write, model, opt, sched, state, config, zo=zo)
                    last_save = time.monotonic()
                if stop or state["step"] >= config.max_steps:
                    break
            else:  # the epoch ran out of batches
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    except KeyboardInterrupt:
        if ckpt_write is not None:  # the last whole step is kept: run the same command again to resume from it
            _save(ckpt_write, model, opt, sched, state, config, rng=rng, zo=zo)
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
                     time.perf_counter() - start, median, dict(state["calls"]), state["stopped"])


#: What ``FitResult.calls`` and ``history.jsonl`` count: forward calls and samples, training and validation apart;
#: ``step`` is the calls of the last training step (what the next one will cost).
CALL_KEYS = ("train", "train_samples", "val", "val_samples", "step")


@contextmanager
def counted(model: AdaptedModel, calls: dict[str, int], phase: str, allowed: int | None = None) -> Iterator[None]:
    """Add the forward calls and samples ``model`` sends inside the block to ``calls[phase]``/``[phase_samples]``.

    With ``allowed``, the call past that many is refused before it is sent (``BudgetSpent``).
    """
    handle = model.handle
    exposure = handle.exposure
    queries, samples = exposure.forward_queries, exposure.forward_samples
    if allowed is not None:
        model.handle = MeteredHandle(handle, allowed)
    try:
        yield
    finally:
        model.handle = handle
        calls[phase] += exposure.forward_queries - queries
        calls[f"{phase}_samples"] += exposure.forward_samples - samples


def _affordable(config: TrainConfig, calls: dict[str, int]) -> bool:
    """Whether another step fits in ``max_calls`` (its cost: the last step's; unknown before the first)."""
    return not config.max_calls or calls["train"] + calls["step"] <= config.max_calls


def _gradients(model: AdaptedModel, task: Task, group: list[Any], config: TrainConfig, zo: ZerothOrder | None,
               state: dict[str, Any]) -> float:
    """One step's gradients (and zeroth-order estimates) in ``.grad``; the step's loss. Counts its calls."""
    calls = state["calls"]
    before = calls["train"]
    allowed = config.max_calls - calls["train"] if config.max_calls else None
    loss_value = 0.0
    with counted(model, calls, "train", allowed):
        for part, batch in enumerate(group):
            if zo is not None:
                loss_value += zo.accumulate(lambda b=batch: task.loss(model, b), state["step"], part,
                                            1.0 / config.grad_accum)
                continue
            loss = task.loss(model, batch) / config.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
    calls["step"] = calls["train"] - before
    if zo is not None:
        zo.write_grads()
    return loss_value


def _out_of_budget(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig, state: dict[str, Any],
                   opt: Any, zo: ZerothOrder | None, history: History, bar: Any, last_loss: float) -> bool:
    """A step was cut short by ``max_calls``: drop it, validate the last whole step, stop (True).

    Raises:
        InvalidInputError: the budget cannot pay for a single step.
    """
    opt.zero_grad(set_to_none=True)
    if zo is not None:
        zo.discard()
    if state["step"] == 0:
        evaluations = (f"{2 * zo.settings.q * config.grad_accum} loss evaluations (2 × zo_q × grad_accum), each the "
                       "task's batched forwards" if zo is not None else f"{config.grad_accum} loss evaluations")
        raise InvalidInputError(f"max_calls={config.max_calls} does not pay for one training step: the first was cut "
                                f"short after {state['calls']['train']} forward calls; a step takes {evaluations}. "
                                "Raise --max-calls, or lower --grad-accum" + (" or --zo-q" if zo is not None else ""))
    if not state["history"] or state["history"][-1]["step"] != state["step"]:
        _validate(model, task, val_data, config, state, last_loss, history, bar, zo)
    state["stopped"] = "max_calls"
    return True


HISTORY_NAME = "history.jsonl"


class History:
    """``history.jsonl``: one JSON object per logged step and per validation, appended (a resumed run continues it).

    Lines: ``{"event": "step", "step", "epoch", "loss", "lr", "step_seconds", "samples_per_s",
    "forward_queries", "gradient_queries", "time_s", "train_calls", "train_samples", "val_calls",
    "val_samples"}`` and ``{"event": "val", "step", "metrics", "primary", "best", "train_calls",
    "train_samples", "val_calls", "val_samples"}``; metrics on a 0–1 scale. ``forward_queries`` and
    ``gradient_queries`` are the handle's totals in this process; the ``*_calls`` and ``*_samples``
    counts are the run's (they continue across a resume). ``calls_curve`` reads the validation lines
    as accuracy against training calls.
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
                for key in ("loss", "lr", "samples_per_s", "forward_queries", "gradient_queries", "train_calls"):
                    self.board.add_scalar(f"train/{key}", record[key], step)
            else:
                for key, value in record["metrics"].items():
                    self.board.add_scalar(f"val/{key}", value, step)
                    self.board.add_scalar(f"val_by_train_calls/{key}", value, record["train_calls"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()

    def step(self, model: AdaptedModel, state: dict[str, Any], loss: float, lr: float, seconds: float,
             samples: int, elapsed: float) -> None:
        exposure = model.handle.exposure
        self.write({"event": "step", "step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": lr,
                    "step_seconds": seconds, "samples_per_s": samples / seconds if seconds > 0 else 0.0,
                    "forward_queries": exposure.forward_queries, "gradient_queries": exposure.gradient_queries,
                    "time_s": elapsed, **call_fields(state["calls"])})


def call_fields(calls: dict[str, int]) -> dict[str, int]:
    """The run's call counts as history lines name them: ``train_calls``, ``train_samples``, ``val_calls``, ..."""
    return {"train_calls": calls["train"], "train_samples": calls["train_samples"], "val_calls": calls["val"],
            "val_samples": calls["val_samples"]}


def calls_curve(history: str | os.PathLike[str] | list[dict[str, Any]], metric: str | None = None,
                ) -> list[tuple[int, float]]:
    """``(training calls, validation metric)`` at each validation of a run: an accuracy-vs-calls curve.

    Args:
        history: a run's ``history.jsonl`` (in its ``--out``), its folder, or the lines already read.
        metric: a validation metric (default: the task's primary one, e.g. ``accuracy``).

    Example:
        >>> calls_curve("runs/dga-zo")   # [(120, 0.62), (240, 0.66), ...]
    """
    if not isinstance(history, list):
        path = Path(history)
        path = path / HISTORY_NAME if path.is_dir() else path
        history = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in history if r.get("event") == "val"]
    return [(int(r["train_calls"]), float(r["metrics"][metric or r["primary"]])) for r in rows if "train_calls" in r]


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
              loss: float, history: History, bar: Any, zo: ZerothOrder | None = None) -> bool:
    with counted(model, state["calls"], "val"):
        metrics = task.evaluate(model, val_data)
    value = metrics[task.primary]
    calls = call_fields(state["calls"])
    state["history"].append({"step": state["step"], "loss": loss, **{f"val_{k}": v for k, v in metrics.items()},
                             "train_calls": calls["train_calls"], "val_calls": calls["val_calls"]})
    best = value > state["best"]
    history.write({"event": "val", "step": state["step"], "metrics": metrics, "primary": task.primary,
                   "best": best, **calls})
    log.info("step %d: val %s = %.3f", state["step"], task.primary, value)
    if not bar.disable:  # shown with the progress bar, on stderr
        bar.write(f"step {state['step']}: val {task.primary} {value:.4f}" + (" (best so far)" if best else ""),
                  file=sys.stderr)
    if best:
        state.update(best=value, best_step=state["step"], bad=0,
                     best_state={k: v.detach().clone() for k, v in _tunable(model, zo).items()})
    else:
        state["bad"] += 1
    if config.patience and state["bad"] >= config.patience:
        state["stopped"] = "patience"
        return True
    return False


def _save(path: Path, model: AdaptedModel, opt: Any, sched: Any, state: dict[str, Any], config: TrainConfig,
          rng: torch.Tensor | None = None, zo: ZerothOrder | None = None) -> None:
    payload = {
        "trainable": {k: v.detach().clone() for k, v in _tunable(model, zo).items()},
        "zeroth_order": zo.state_dict() if zo is not None else None,
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
    """The settings a resumed run must share with the run it continues (the cadence and the budget may change)."""
    return {k: v for k, v in asdict(config).items() if k not in ("checkpoint_every", "max_calls")}


def _resume(path: Path, model: AdaptedModel, opt: Any, sched: Any, config: TrainConfig,
            zo: ZerothOrder | None = None) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for a damaged file
        raise InvalidInputError(f"checkpoint {path} is damaged or truncated ({type(err).__name__}: "
                                f"{str(err)[:120]}); delete it to start the run over (the adapter of a finished "
                                "run is not in it)") from None
    trainable = _tunable(model, zo)
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
    if zo is not None and payload.get("zeroth_order") is not None:
        zo.load_state_dict(payload["zeroth_order"])
    return payload["state"]
