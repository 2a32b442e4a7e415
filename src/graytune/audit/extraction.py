"""Functional extraction: distil a surrogate from the backbone's answers and measure how close it gets.

At black-box the student learns from outputs alone. From dark-gray up each call also asks the VJP
for a random output gradient, and the student matches that Jacobian product as well (Jacobian
matching, Srinivas & Fleuret 2018): a forward and its VJP are two calls. The student trains online
(``steps_per_call`` updates after each call) and, at log-spaced call counts (1, 2, 5, 10, 20, 50,
...), a little longer before it is scored on held-out items it never sent:

- ``cosine``: mean cosine between the surrogate's and the backbone's embeddings;
- ``explained_variance``: 1 − ‖surrogate − backbone‖² / ‖backbone − its mean‖² (0 for a constant);
- ``probe_accuracy``: a linear probe on the surrogate's features, on the real task, and
  ``probe_ratio``: that accuracy over the backbone's own probe accuracy (the extraction target);
- ``agreement``: the fraction of held-out items both probes put in the same class.

Example:
    >>> result = extract(handle, tower, data, reference, budget=1000, rows=32, grad=False, config=config)
    >>> result["checkpoints"][-1]["probe_ratio"]
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graytune.audit.config import AuditConfig
from graytune.audit.data import AuditData, QueryStream
from graytune.audit.meter import CallMeter
from graytune.audit.probe import accuracy, linear_probe
from graytune.audit.students import BagOfTokens, Replay, RowAdam, outputs_and_vjp, relative_mse
from graytune.audit.towers import Tower
from graytune.errors import RemoteError

log = logging.getLogger(__name__)
Tensor = torch.Tensor
BATCH = 64  # the student's minibatch
JACOBIAN_BATCH = 16  # of which the rows whose VJP is matched too (a double backward costs a few forwards)
POLISH = 25  # extra updates at a checkpoint, per update made after each call
#: answers a server may give that end an attack early, and are themselves a finding (quota, refusal)
STOPPING = (403, 429)


@dataclass
class Reference:
    """The owner's side of the comparison: the backbone's embeddings of the probe sets, and its probe."""

    train: Tensor  # [N_train, E]
    test: Tensor  # [N_test, E]
    predictions: Tensor  # [N_test] the backbone's probe's classes
    accuracy: float
    calls: int  # boundary calls the owner spent to get these (not the attacker's)


def log_checkpoints(budget: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``budget``, and ``budget`` itself."""
    marks = sorted({m * 10**k for k in range(int(math.log10(budget)) + 1) for m in (1, 2, 5)} | {budget})
    return [m for m in marks if m <= budget]


def extract(handle: Any, tower: Tower, data: AuditData, reference: Reference, grad: bool, config: AuditConfig,
            progress: bool = True) -> dict[str, Any]:
    """Distil a surrogate through ``handle`` within ``config.budget`` calls; its scores at each checkpoint.

    Returns:
        ``{"attack", "checkpoints": [{calls, forwards, vjps, samples, grad_rows, cosine, ...}], "spent",
        "stopped"}``; ``stopped`` says why it ended before the budget (a server's quota or refusal), else None.
    """
    torch.manual_seed(config.seed)
    meter = CallMeter(handle, config.budget)
    stream = QueryStream(data.pool, config.seed)
    student = tower.student()
    optimizers: list[Any] = [torch.optim.Adam(student.parameters(), lr=1e-3)]
    if isinstance(student, BagOfTokens):
        optimizers.append(RowAdam(student))
    replay = Replay(max(BATCH, int(config.buffer_mb * 2**20) // tower.row_bytes(grad)), config.seed)
    cost = 2 if grad else 1
    marks = log_checkpoints(config.budget)
    checkpoints = [_score(student, tower, data, reference, meter, 0.0)]
    stopped, start = None, time.monotonic()
    label = f"{handle.access.label} extraction"
    with tqdm(total=config.budget, desc=label, unit="call", disable=not progress) as bar:
        while meter.afford(cost):
            try:
                answer = tower.query(handle, stream.next(config.rows), grad)
            except RemoteError as err:
                if err.status not in STOPPING:
                    raise
                stopped = str(err)
                log.warning("%s stopped after %d calls: %s", label, meter.calls, err)
                break
            if answer.vjp is not None:
                meter.grad_rows += len(answer.outputs)
            replay.add(*tower.rows(answer))
            _train(student, optimizers, tower, replay, config.steps_per_call)
            bar.update(meter.calls - bar.n)
            if marks and meter.calls >= marks[0]:
                while marks and meter.calls >= marks[0]:
                    marks.pop(0)
                _train(student, optimizers, tower, replay, POLISH * config.steps_per_call)
                checkpoints.append(_score(student, tower, data, reference, meter, time.monotonic() - start))
                bar.set_postfix(probe_ratio=f"{checkpoints[-1]['probe_ratio']:.2f}")
    if checkpoints[-1]["calls"] < meter.calls:
        _train(student, optimizers, tower, replay, POLISH * config.steps_per_call)
        checkpoints.append(_score(student, tower, data, reference, meter, time.monotonic() - start))
    attack = ("outputs only (distillation)" if not grad else
              f"outputs and VJPs at {tower.grad_port} (distillation with Jacobian matching)")
    return {"attack": attack, "student": type(student).__name__,
            "student_parameters": sum(p.numel() for p in student.parameters()),
            "checkpoints": checkpoints, "spent": meter.spent(), "stopped": stopped}


@contextlib.contextmanager
def student_threads() -> Iterator[None]:
    """The student's small ops on one thread: on 2 shared cores, a second thread costs more than it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(student: torch.nn.Module, optimizers: list[Any], tower: Tower, replay: Replay,
           steps: int) -> None:
    """``steps`` updates on minibatches from ``replay``: relative output error, plus relative VJP error."""
    student.train()
    with student_threads():
        _steps(student, optimizers, tower, replay, steps)


def _steps(student: torch.nn.Module, optimizers: list[Any], tower: Tower, replay: Replay, steps: int) -> None:
    for _ in range(steps):
        if not len(replay):
            return
        batch, targets = tower.collate(replay.sample(BATCH))
        for opt in optimizers:
            opt.zero_grad()
        loss = relative_mse(student(batch), targets[0])
        if len(targets) == 3:  # outputs, v, vjp: the Jacobian term on the first JACOBIAN_BATCH rows
            part = tuple(t[:JACOBIAN_BATCH] for t in batch) if isinstance(batch, tuple) else batch[:JACOBIAN_BATCH]
            _, vjp = outputs_and_vjp(student, part, targets[1][:JACOBIAN_BATCH], create_graph=True)
            loss = loss + relative_mse(vjp, targets[2][:JACOBIAN_BATCH])
        loss.backward()
        for opt in optimizers:
            opt.step()


@torch.no_grad()
def _features(student: torch.nn.Module, tower: Tower, items: Any, size: int = 256) -> Tensor:
    """The student's outputs ``[N, E]`` for ``items``, prepared (tokenized, resized) ``size`` at a time."""
    student.eval()
    return torch.cat([student(tower.prepare(items[i:i + size])) for i in range(0, len(items), size)])


def _score(student: torch.nn.Module, tower: Tower, data: AuditData, reference: Reference, meter: CallMeter,
           seconds: float) -> dict[str, Any]:
    with student_threads():
        train, test = _features(student, tower, data.train_items), _features(student, tower, data.test_items)
        predictions = linear_probe(train, data.train_labels, test, len(data.class_names))
    truth = reference.test
    probe = accuracy(predictions, data.test_labels)
    residual = (test - truth).pow(2).sum()
    spread = (truth - truth.mean(0)).pow(2).sum().clamp_min(1e-12)
    return {**meter.spent(), "seconds": round(seconds, 2),
            "cosine": round(float(F.cosine_similarity(test, truth, dim=1).mean()), 4),
            "explained_variance": round(float(1 - residual / spread), 4),
            "probe_accuracy": round(probe, 4), "probe_ratio": round(probe / max(reference.accuracy, 1e-9), 4),
            "agreement": round(accuracy(predictions, reference.predictions), 4)}
