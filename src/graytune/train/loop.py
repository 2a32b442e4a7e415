"""The training loop: AdamW, warm-up then cosine, accumulation, early stopping on validation, exact resume.

Every ``eval_every`` optimizer steps (default: once per epoch) it evaluates on the validation set
(never the test set), keeps the best adapter state, and writes an atomic checkpoint (trainable
tensors, optimizer, scheduler, RNG, position in the epoch), so an interrupted run resumes where it
stopped and ends with the same adapter as an uninterrupted one.

The loop is the loop alone. Where gradients come from is a ``GradientSource``
(``graytune.train.gradients``: backprop, or zeroth-order estimates from forward calls alone);
the call budget is ``graytune.train.budget``; data-parallel arithmetic is
``graytune.train.distributed``; the checkpoint's keys are ``graytune.train.checkpoint``'s; the run
folder's files and history loggers are ``graytune.runs``'. A new kind of run (a new loss, a new
model shape) is a new ``Task``, not a change here.

Example:
    >>> result = fit(model, task, val_data, TrainConfig(max_steps=100), checkpoint="out/ckpt.pt")
    >>> result.best_metric, result.steps, result.calls["train"]
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from graytune.access import BudgetSpent
from graytune.errors import InvalidInputError, RemoteError
from graytune.model import AdaptedModel
from graytune.runs import RunLogger, open_logger
from graytune.schedules import adamw_warmup_cosine
from graytune.train.budget import (CALL_UNITS, affordable, allowance, call_fields, counted, evaluated,
                                   restore_evaluations)
from graytune.train.checkpoint import counts_between, exposure_counts, load_checkpoint, save_checkpoint
from graytune.train.config import TrainConfig, checkpoint_cadence
from graytune.train.distributed import average_gradients, global_batch, rank_batches, world_position
from graytune.train.gradients import GradientSource, gradient_source
from graytune.train.state import FitResult, FitState
from graytune.train.tasks import Task

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, SLURM, Kubernetes) while ``fit`` ran with a checkpoint: handled as Ctrl-C
    is (the last whole step checkpointed), then raised on."""


class Paused(Exception):
    """``fit``'s ``pause`` event was set: the step under way finished, was checkpointed, and the run stopped
    there; calling ``fit`` again with the same checkpoint continues it exactly."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"paused after step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def fit(model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig,
        checkpoint: str | os.PathLike[str] | None = None, progress: bool = True, tensorboard: bool = False,
        settings: dict[str, Any] | None = None, pause: threading.Event | None = None) -> FitResult:
    """Train ``model``'s trainable tensors on ``task``; returns with the best validated state loaded.

    With ``checkpoint`` (a path), an atomic checkpoint is written at every validation, every
    ``config.checkpoint_every``, on Ctrl-C, on SIGTERM (``Terminated``) and on a fatal error of a backbone
    server (``RemoteError``: a quota spent, the server gone), each keeping the last whole step; a run that
    finds one resumes from it exactly, after checking it was written with the same settings: ``config``'s,
    the adapters' options and ``settings`` (plain data, e.g. the data's name and content hashes).
    Every step and validation goes to ``history.jsonl`` beside it (and, with ``tensorboard``, TensorBoard
    events in ``tensorboard/`` there too). ``pause`` (with ``checkpoint``): once the event is set, the step under
    way finishes (its validation too), is checkpointed, and ``Paused`` is raised (a fine-tuning job's pause).

    Raises:
        InvalidInputError: no learning rate, nothing to train, zeroth-order settings for a model without
            zeroth-order adapters, ``max_calls`` below the calls of one training step, or a checkpoint written
            with other settings.
        Terminated: SIGTERM arrived (after the checkpoint was written).
        Paused: ``pause`` was set (after the checkpoint was written).
    """
    ckpt = Path(checkpoint) if checkpoint else None
    if pause is not None and ckpt is None:
        raise InvalidInputError("fit(pause=...) needs a checkpoint to pause into")
    run = _Run(model, task, val_data, config, ckpt, progress, tensorboard, settings)
    with _sigterm_raises(ckpt is not None):
        try:
            while run.state.step < config.max_steps and not run.stop:
                for group in epoch_groups(task, config, run.state):
                    if run.step(group):
                        break
                    if pause is not None and pause.is_set():
                        run.pause()
                else:  # the epoch ran out of batches
                    run.state.epoch += 1
                    run.state.batch_in_epoch = 0
        except Terminated:
            run.interrupted("stopped by SIGTERM")
            raise
        except KeyboardInterrupt:
            run.interrupted("interrupted")
            raise
        except RemoteError:
            run.interrupted("stopped by the backbone server's error below")
            raise
        finally:
            run.close()
    return run.result()


@contextmanager
def _sigterm_raises(active: bool) -> Iterator[None]:
    """While the block runs (``active``, in the main thread): SIGTERM raises ``Terminated`` once (a second one
    while the checkpoint is written is ignored); the handler there before is put back after."""
    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return
    seen: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if not seen:
            seen.append(signum)
            raise Terminated(f"signal {signum} (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def epoch_groups(task: Task, config: TrainConfig, state: FitState) -> Iterator[list[Any]]:
    """This epoch's groups of ``grad_accum`` batches, from where a resumed run left off."""
    gen = torch.Generator().manual_seed(config.seed * 100_003 + state.epoch)
    batches = rank_batches(task, config.batch_size, gen)
    for _ in range(state.batch_in_epoch * config.grad_accum):
        next(batches, None)
    while True:
        group = [b for b in (next(batches, None) for _ in range(config.grad_accum)) if b is not None]
        if len(group) < config.grad_accum:
            return
        yield group


class _Run:
    """One ``fit``: its optimizer, gradient source, state, logger and checkpoint; ``step`` runs one step."""

    def __init__(self, model: AdaptedModel, task: Task, val_data: Any, config: TrainConfig, ckpt: Path | None,
                 progress: bool, tensorboard: bool, settings: dict[str, Any] | None = None) -> None:
        if config.lr is None:
            raise InvalidInputError("TrainConfig.lr is None: give a learning rate (graytune methods lists each "
                                    "method's default)")
        rank, world = world_position()
        if config.max_calls and world > 1:
            raise InvalidInputError("max_calls counts the calls of one process; run graytune train, not the "
                                    "data-parallel entry point, to train within a budget of calls")
        self.model, self.task, self.val_data, self.config = model, task, val_data, config
        self.source: GradientSource = gradient_source(model, config, world)
        self.params = {**trainable(model), **self.source.variables()}
        if not self.params:
            raise InvalidInputError(f"method {model.method!r} has nothing to train; evaluate it instead")
        seed_everything(config.seed)
        self.opt, self.sched = adamw_warmup_cosine(self.params.values(), config.lr, config.weight_decay,
                                                   config.max_steps, config.warmup)
        self.samples = global_batch(config.batch_size) * config.grad_accum  # per optimizer step
        per_epoch = len(task) // self.samples
        if per_epoch < 1:
            raise InvalidInputError(f"the training set has {len(task)} samples, fewer than one step's "
                                    f"{self.samples}; lower --batch-size or add data")
        self.eval_every = config.eval_every or per_epoch
        self.state = FitState()
        self.ckpt, self.settings = ckpt, {"options": model.adapter_options(), **(settings or {})}
        resumed = ckpt is not None and ckpt.is_file()
        self.counted_before = exposure_counts(model.handle.exposure)  # what this run's checkpoints leave out
        if resumed:
            self.state = load_checkpoint(ckpt, model, self.tensors(), self.opt, self.sched, config, self.source,
                                         self.settings, exposure=model.handle.exposure)
            restore_evaluations(self.state.calls, self.state.step, config.grad_accum, self.source)
            log.info("resumed from %s at step %d", ckpt, self.state.step)
        writer = rank == 0  # rank 0 writes the run's files; every rank resumes from them
        about = {"method": model.method, **{k: self.settings[k] for k in ("data", "task") if k in self.settings},
                 "calls_counted": CALL_UNITS}
        self.logger: RunLogger = open_logger(ckpt.parent if ckpt is not None and writer else None,
                                             tensorboard and writer, self.state.step if resumed else None, about)
        self.ckpt_write = ckpt if writer else None
        self.every_steps, self.every_seconds = checkpoint_cadence(config.checkpoint_every)
        self.start, self.step_times, self.last_save = time.perf_counter(), [], time.monotonic()
        self.bar = tqdm(total=config.max_steps, initial=self.state.step, desc=f"train {model.method}", unit="step",
                        disable=not progress or not writer)
        if resumed and not self.bar.disable:  # the one sign a user sees at default verbosity, on stderr
            self.bar.write(f"resuming from step {self.state.step} of {config.max_steps}: {ckpt} (same settings "
                           "and data, checked)", file=sys.stderr)
        self.rng, self.last_loss = torch.get_rng_state(), 0.0
        self.stop = not affordable(config, self.state.calls)
        if self.stop:  # a resumed run whose budget is spent
            self.state.stopped = "max_calls"

    def tensors(self) -> dict[str, torch.Tensor]:
        """What training changes: the tensors that get gradients and the source's own (checkpoints, best state)."""
        return {**trainable(self.model), **self.source.tensors()}

    def step(self, group: list[Any]) -> bool:
        """One optimizer step over ``group`` (``grad_accum`` batches); whether the run stops after it."""
        state, config = self.state, self.config
        t0, self.rng = time.perf_counter(), torch.get_rng_state()
        self.opt.zero_grad(set_to_none=True)
        try:
            loss = self.gradients(group)
        except BudgetSpent:
            self.stop = self.out_of_budget()
            return True
        loss = average_gradients(self.params, loss)
        self.last_loss = loss
        lr = self.opt.param_groups[0]["lr"]  # the rate this step used
        self.opt.step()
        self.sched.step()
        self.source.after_step()
        self.step_times.append(time.perf_counter() - t0)
        state.step += 1
        state.batch_in_epoch += 1
        self.rng = torch.get_rng_state()  # the step is whole: an interrupt from here on keeps it
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}", calls=state.calls["train"])
        self.log_step(loss, lr)
        due = bool((self.every_steps and state.step % self.every_steps == 0) or (
            self.every_seconds and time.monotonic() - self.last_save >= self.every_seconds))
        spent = not affordable(config, state.calls)
        if state.step % self.eval_every == 0 or state.step == config.max_steps or spent:
            self.stop = self.validate(loss)
            due = True
        if spent:
            state.stopped, self.stop = "max_calls", True
            log.info("the next step would pass max_calls=%d (%d training tower calls spent, %d a step; %d model "
                     "evaluations); stopping", config.max_calls, state.calls["train"], state.calls["step"],
                     state.calls["train_evaluations"])
        if self.ckpt_write is not None and due:
            self.save()
            self.last_save = time.monotonic()
        return self.stop or state.step >= config.max_steps

    def gradients(self, group: list[Any]) -> float:
        """One step's gradients (or estimates) in ``.grad``; the step's loss. Counts its calls."""
        calls = self.state.calls
        before, loss = calls["train"], 0.0
        with counted(self.model, calls, "train", allowance(self.config, calls)):
            for part, batch in enumerate(group):
                loss_of = evaluated(lambda b=batch: self.task.loss(self.model, b), calls, "train")
                loss += self.source.accumulate(loss_of, self.state.step, part, self.config.grad_accum)
        calls["step"] = calls["train"] - before
        self.source.write_grads()
        return loss

    def out_of_budget(self) -> bool:
        """A step was cut short by ``max_calls``: drop it, validate the last whole step, stop (True).

        Raises:
            InvalidInputError: the budget cannot pay for a single step.
        """
        state, config = self.state, self.config
        self.opt.zero_grad(set_to_none=True)
        self.source.discard()
        if state.step == 0:
            raise InvalidInputError(
                f"max_calls={config.max_calls} does not pay for one training step: the first was cut short after "
                f"{state.calls['train']} forward calls; a step takes {self.source.step_cost(config.grad_accum)}. "
                f"Raise --max-calls, or lower {self.source.cost_flags}")
        if not state.history or state.history[-1]["step"] != state.step:
            self.validate(self.last_loss)
        state.stopped = "max_calls"
        return True

    def validate(self, loss: float) -> bool:
        """Evaluate on the validation set, keep the best state; whether ``patience`` ends the run."""
        state, task = self.state, self.task
        with counted(self.model, state.calls, "val"):
            metrics = task.evaluate(self.model, self.val_data)
        value = metrics[task.primary]
        calls = call_fields(state.calls)
        state.history.append({"step": state.step, "loss": loss, **{f"val_{k}": v for k, v in metrics.items()},
                              **{k: calls[k] for k in ("train_calls", "train_evaluations", "val_calls")}})
        best = value > state.best
        self.logger.log({"event": "val", "step": state.step, "metrics": metrics, "primary": task.primary,
                         "best": best, **calls})
        log.info("step %d: val %s = %.3f", state.step, task.primary, value)
        if not self.bar.disable:  # shown with the progress bar, on stderr
            self.bar.write(f"step {state.step}: val {task.primary} {value:.4f}" + (" (best so far)" if best else ""),
                           file=sys.stderr)
        if best:
            state.best, state.best_step, state.bad = value, state.step, 0
            state.best_state = {k: v.detach().clone() for k, v in self.tensors().items()}
        else:
            state.bad += 1
        if self.config.patience and state.bad >= self.config.patience:
            state.stopped = "patience"
            return True
        return False

    def log_step(self, loss: float, lr: float) -> None:
        exposure, seconds = self.model.handle.exposure, self.step_times[-1]
        self.logger.log({"event": "step", "step": self.state.step, "epoch": self.state.epoch, "loss": loss, "lr": lr,
                         "step_seconds": seconds, "samples_per_s": self.samples / seconds if seconds > 0 else 0.0,
                         "forward_queries": exposure.forward_queries, "gradient_queries": exposure.gradient_queries,
                         "time_s": time.perf_counter() - self.start, **call_fields(self.state.calls)})

    def save(self, rng: torch.Tensor | None = None) -> None:
        if self.ckpt_write is not None:
            save_checkpoint(self.ckpt_write, self.tensors(), self.opt, self.sched, self.state, self.config,
                            self.source, rng, self.settings,
                            counts_between(exposure_counts(self.model.handle.exposure), self.counted_before))

    def interrupted(self, why: str) -> None:
        """Ctrl-C, SIGTERM or a fatal server error (``why``): the last whole step is kept; the same command
        resumes from it."""
        if self.ckpt_write is not None:
            self.save(rng=self.rng)
            self.bar.write(f"{why} at step {self.state.step}; checkpoint saved to {self.ckpt}: run the same "
                           "command again to resume", file=sys.stderr)

    def pause(self) -> None:
        """Checkpoint the whole step just taken (with the random state the next step would start from) and raise
        ``Paused``."""
        self.save()
        assert self.ckpt is not None
        raise Paused(self.state.step, self.ckpt)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()

    def result(self) -> FitResult:
        state = self.state
        if state.best_state is not None:
            self.model.load_state_dict(state.best_state, strict=False)
        median = float(np.median(self.step_times)) if self.step_times else 0.0
        return FitResult(state.step, state.best, state.best_step, state.history, time.perf_counter() - self.start,
                         median, dict(state.calls), state.stopped)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors that get gradients, by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
