"""Functional extraction: distil a surrogate from the backbone's answers and measure how close it gets.

Three attacks, each within the budget of calls (``graytune.audit.towers`` says what each call sends):

- ``outputs`` (black-box): the student learns the outputs alone.
- ``differences`` (black-box): each item also goes out under ``k`` small edits at the input (per token at
  ``text.token_embeds``), in the same forward and with no gradient asked; the student matches the output
  slopes along those edits (its own secant at the same ``ε``) as well as the outputs.
- ``vjp`` (dark-gray and up): each item goes out ``c`` times with per-token edits and comes back with ``c``
  VJPs, one per output cotangent; the student matches those per-token Jacobian products (Jacobian
  matching, Srinivas & Fleuret 2018) as well as the outputs. A forward and its VJP are two calls.

The student trains online (``steps_per_call`` updates after each call) and, at log-spaced call counts
(1, 2, 5, 10, 20, 50, ...), a little longer before it is scored on held-out items it never sent:

- ``cosine``: mean cosine between the surrogate's and the backbone's embeddings;
- ``explained_variance``: 1 − ‖surrogate − backbone‖² / ‖backbone − its mean‖² (0 for a constant);
- ``probe_accuracy``: a linear probe on the surrogate's features, on the real task, and
  ``probe_ratio``: that accuracy over the backbone's own probe accuracy (the extraction target);
- ``agreement``: the fraction of held-out items both probes put in the same class.

Example:
    >>> result = extract(handle, tower, data, reference, Probe("vjp", 4), config)
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
from graytune.audit.students import AttentiveBag, Replay, RowAdam, relative_mse, secant, student_size, vjp
from graytune.audit.towers import Probe, TextTower, Tower, query
from graytune.errors import RemoteError

log = logging.getLogger(__name__)
Tensor = torch.Tensor
BATCH = 64  # the student's minibatch of outputs
JACOBIAN_BATCH = 16  # its minibatch of derivative rows (a double backward costs a few forwards)
POLISH = 25  # extra updates at a checkpoint, per update made after each call
#: answers a server may give that end an attack early, and are themselves a finding (quota, refusal)
STOPPING = (403, 429)
ATTACKS = {"outputs": "outputs only (distillation)",
           "differences": "outputs and finite-difference slopes along per-token edits at {port}, no gradient asked "
                          "(distillation with secant matching)",
           "vjp": "outputs and per-token VJPs at {port}, {per_item} cotangents per item (distillation with "
                  "Jacobian matching)"}


@dataclass
class Reference:
    """The owner's side of the comparison: the backbone's embeddings of the probe sets, and its probe."""

    train: Tensor  # [N_train, E]
    test: Tensor  # [N_test, E]
    predictions: Tensor  # [N_test] the backbone's probe's classes
    accuracy: float
    calls: int  # boundary calls the owner spent to get these (not the attacker's)


@dataclass
class Learner:
    """The student, its optimizers and the replays it learns from."""

    student: torch.nn.Module
    optimizers: list[Any]
    outputs: Replay
    derivatives: Replay | None
    probe: Probe


def log_checkpoints(budget: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``budget``, and ``budget`` itself."""
    marks = sorted({m * 10**k for k in range(int(math.log10(budget)) + 1) for m in (1, 2, 5)} | {budget})
    return [m for m in marks if m <= budget]


def extract(handle: Any, tower: Tower, data: AuditData, reference: Reference, probe: Probe, config: AuditConfig,
            progress: bool = True) -> dict[str, Any]:
    """Distil a surrogate through ``handle`` within ``config.budget`` calls; its scores at each checkpoint.

    Returns:
        ``{"attack", "mode", "checkpoints": [{calls, forwards, vjps, samples, grad_rows, edit_rows, cosine,
        ...}], "spent", "stopped"}``; ``stopped`` says why it ended before the budget (a server's quota or
        refusal), else None.
    """
    torch.manual_seed(config.seed)
    meter = CallMeter(handle, config.budget)
    stream = QueryStream(data.pool, config.seed)
    generator = torch.Generator().manual_seed(config.seed + 1)
    learner = _learner(tower, probe, config)
    cost = 2 if probe.mode == "vjp" else 1
    marks = log_checkpoints(config.budget)
    checkpoints = [_score(learner.student, tower, data, reference, meter, 0.0)]
    stopped, start = None, time.monotonic()
    label = f"{handle.access.label} extraction ({probe.mode})"
    with tqdm(total=config.budget, desc=label, unit="call", disable=not progress) as bar:
        while meter.afford(cost):
            try:
                answer = query(tower, handle, stream.next(probe.items(config.rows)), probe, generator)
            except RemoteError as err:
                if err.status not in STOPPING:
                    raise
                stopped = str(err)
                log.warning("%s stopped after %d calls: %s", label, meter.calls, err)
                break
            if probe.mode == "vjp":  # rows whose gradient came back (edit rows: the exposure record's)
                meter.grad_rows += len(answer.along)
            learner.outputs.add(*tower.rows(answer.batch, answer.outputs))
            if learner.derivatives is not None and answer.derivative is not None:
                learner.derivatives.add(*tower.rows(answer.probe_batch, answer.along, answer.derivative))
            _train(learner, tower, config.steps_per_call)
            bar.update(meter.calls - bar.n)
            if marks and meter.calls >= marks[0]:
                while marks and meter.calls >= marks[0]:
                    marks.pop(0)
                _train(learner, tower, POLISH * config.steps_per_call)
                checkpoints.append(_score(learner.student, tower, data, reference, meter, time.monotonic() - start))
                bar.set_postfix(probe_ratio=f"{checkpoints[-1]['probe_ratio']:.2f}")
    if checkpoints[-1]["calls"] < meter.calls:
        _train(learner, tower, POLISH * config.steps_per_call)
        checkpoints.append(_score(learner.student, tower, data, reference, meter, time.monotonic() - start))
    attack = ATTACKS[probe.mode].format(port=tower.grad_port, per_item=probe.per_item)
    return {"attack": attack, "mode": probe.mode, "per_item": probe.per_item,
            "epsilon": probe.epsilon if probe.mode == "differences" else None,
            "student": type(learner.student).__name__, "student_size": student_size(learner.student),
            "student_parameters": student_size(learner.student)["total"],
            "checkpoints": checkpoints, "spent": meter.spent(), "stopped": stopped}


def _learner(tower: Tower, probe: Probe, config: AuditConfig) -> Learner:
    student = tower.student()
    optimizers: list[Any] = [torch.optim.Adam(student.parameters(), lr=1e-3)]
    if isinstance(student, AttentiveBag):
        optimizers.append(RowAdam(student))
    memory = int(config.buffer_mb * 2**20)  # for the outputs, as in every attack, and as much for derivatives
    outputs = Replay(max(BATCH, memory // tower.row_bytes("outputs")), config.seed)
    if probe.mode == "outputs":
        return Learner(student, optimizers, outputs, None, probe)
    derivatives = Replay(max(JACOBIAN_BATCH, memory // tower.row_bytes(probe.mode)), config.seed + 1)
    return Learner(student, optimizers, outputs, derivatives, probe)


@contextlib.contextmanager
def student_threads() -> Iterator[None]:
    """The student's small ops on one thread: on 2 shared cores, a second thread costs more than it gives."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(learner: Learner, tower: Tower, steps: int) -> None:
    """``steps`` updates on minibatches from the replays: relative output error, plus relative derivative error."""
    learner.student.train()
    with student_threads():
        for _ in range(steps):
            if not len(learner.outputs):
                return
            _step(learner, tower)


def _step(learner: Learner, tower: Tower) -> None:
    student = learner.student
    batch, (outputs,) = tower.collate(learner.outputs.sample(BATCH))
    for opt in learner.optimizers:
        opt.zero_grad()
    loss = relative_mse(student(batch), outputs)
    if learner.derivatives is not None and len(learner.derivatives):
        rows, (along, target) = tower.collate(learner.derivatives.sample(JACOBIAN_BATCH))
        if learner.probe.mode == "differences":
            mine = secant(student, rows, along.float(), learner.probe.epsilon)
        else:
            width = target.shape[1] if isinstance(tower, TextTower) else 0
            mine = vjp(student, rows, along, width, create_graph=True)
        loss = loss + relative_mse(mine, target)
    loss.backward()
    for opt in learner.optimizers:
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
