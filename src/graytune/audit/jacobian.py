"""The duplicate-row attack: a whole Jacobian from one forward and one VJP.

A VJP returns ``vᵀ J`` per row. Send E copies of one input in one batch, each copy with its own
(zero) edit at the input port, and give the E output rows the E one-hot gradients: row i comes back
as row i of the Jacobian at that input, so the whole ``E x (input size)`` Jacobian costs two calls
where one row per call would cost 2E. The attack is split into chunks when E rows would pass a
server's default limits (``--max-grad-tokens`` 8,192 positions, ``--max-grad-pixels`` 1,605,632), and
its rows are checked against central finite differences of the owner's forward.

A server run with ``--duplicate-rows refuse`` answers 403 and the report says so; with ``count`` it
serves the batch and counts it on the client's ``/v1/stats`` (the report reads it back).

Example:
    >>> found = duplicate_row_jacobian(handle, tower, item, owner, budget=10)
    >>> found["status"], found["spent"]["calls"], found["jacobian_shape"]
    ('recovered', 2, [384, 12, 384])
"""

from __future__ import annotations

from typing import Any

import torch

from graytune.audit.data import Items
from graytune.audit.meter import CallMeter
from graytune.audit.towers import TextTower, Tower
from graytune.errors import RemoteError

Tensor = torch.Tensor
GRAD_POSITIONS = 8192  # graytune serve's default --max-grad-tokens
GRAD_PIXELS = 1605632  # graytune serve's default --max-grad-pixels
DIRECTIONS = 3  # random directions of the finite-difference check
STEPS = (1e-2, 1e-3, 1e-4)  # its step sizes (the length of the move along a unit direction)
MAX_BYTES = 512 * 2**20  # the most Jacobian the attack keeps (images at a large --image-size)


def duplicate_row_jacobian(handle: Any, tower: Tower, item: Items, owner: Any, budget: int,
                           seed: int = 0) -> dict[str, Any]:
    """The Jacobian of ``tower``'s output at one input ``item`` (a one-item list or tensor), by repeated rows."""
    meter = CallMeter(handle, budget)
    base = tower.prepare(item)
    text = isinstance(tower, TextTower)
    width = int(base[0].shape[1]) if text else int(base.shape[-1]) ** 2  # type: ignore[index, union-attr]
    rows_out = tower.out_dim
    chunk = max(1, min(rows_out, (GRAD_POSITIONS if text else GRAD_PIXELS) // width))
    parts, stopped = [], None
    per_row = 4 * (width * tower.dim if text else 3 * width)  # bytes of one Jacobian row
    for start in range(0, rows_out, chunk):
        if not meter.afford(2):
            stopped = f"the budget of {budget} calls ran out"
            break
        if (start + chunk) * per_row > MAX_BYTES:
            stopped = f"the Jacobian would pass {MAX_BYTES // 2**20} MiB; rows past {start} were not asked"
            break
        size = min(chunk, rows_out - start)
        try:
            parts.append(_chunk(handle, tower, base, start, size))
        except RemoteError as err:
            if err.status not in (403, 429):
                raise
            stopped = str(err)
            break
        meter.grad_rows += size
    result: dict[str, Any] = {"rows_per_call": chunk, "spent": meter.spent(), "stopped": stopped,
                              "output_dim": rows_out}
    if not parts:
        result["status"] = "refused" if stopped and "403" in stopped else "not run"
        return result
    jacobian = torch.cat(parts)  # [rows, *input]
    result.update(
        status="recovered" if len(jacobian) == rows_out else "partial", rows=len(jacobian),
        jacobian_shape=list(jacobian.shape),
        finite_difference_error=round(_check(owner, tower, base, jacobian, seed), 5),
        compression=(f"{len(jacobian)} Jacobian rows in {meter.calls} calls; one row per call would take "
                     f"{2 * len(jacobian)} calls"))
    if hasattr(handle, "stats"):
        stats = handle.stats()
        result["server_counted"] = {k: stats[k] for k in ("duplicate_row_batches", "duplicate_rows",
                                                          "duplicate_rows_policy") if k in stats}
    return result


def exact_jacobian(owner: Any, tower: Tower, base: Any) -> Tensor:
    """The owner's exact Jacobian ``[E, *input]`` at ``base`` (a prepared item), by duplicate-row VJPs within the
    server's default gradient limits; evaluation calls of the owner's handle, never an attack's."""
    text = isinstance(tower, TextTower)
    width = int(base[0].shape[1]) if text else int(base.shape[-1]) ** 2
    chunk = max(1, min(tower.out_dim, (GRAD_POSITIONS if text else GRAD_PIXELS) // width))
    return torch.cat([_chunk(owner, tower, base, start, min(chunk, tower.out_dim - start))
                      for start in range(0, tower.out_dim, chunk)])


def _chunk(handle: Any, tower: Tower, base: Any, start: int, size: int) -> Tensor:
    """Rows ``start:start+size`` of the Jacobian, from ``size`` copies of the input in one call and its VJP."""
    out_port = tower.output
    if isinstance(tower, TextTower):
        ids, mask = base
        edit = torch.zeros(size, ids.shape[1], tower.dim, requires_grad=True)  # [E, L, D]: one zero edit per copy
        inputs = {"text.input_ids": ids.repeat(size, 1), "text.attention_mask": mask.repeat(size, 1)}
        out = handle.forward(inputs, add={tower.grad_port: edit}, outputs=[out_port])[out_port]
        at = edit
    else:
        at = base.expand(size, -1, -1, -1).clone().requires_grad_(True)
        out = handle.forward({tower.grad_port: at}, outputs=[out_port])[out_port]
    onehot = torch.zeros_like(out)
    onehot[torch.arange(size), torch.arange(start, start + size)] = 1.0
    (rows,) = torch.autograd.grad(out, at, onehot)
    return rows


@torch.no_grad()
def _check(owner: Any, tower: Tower, base: Any, jacobian: Tensor, seed: int) -> float:
    """Relative error of ``J u`` against the owner's central differences: for each of ``DIRECTIONS`` random unit
    directions the best of ``STEPS`` step sizes (large steps cross the kinks of piecewise-linear activations such as
    ReLU6, small ones meet float32 rounding), and the worst direction. About 1e-3 on smooth towers, 1e-2 on
    piecewise-linear ones."""
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(DIRECTIONS):
        u = torch.randn(jacobian.shape[1:], generator=g)
        u = u / u.norm()
        analytic = jacobian.reshape(len(jacobian), -1) @ u.reshape(-1)
        errors = []
        for eps in STEPS:
            plus, minus = (_output(owner, tower, base, sign * eps * u) for sign in (1.0, -1.0))
            numeric = (plus - minus)[:len(jacobian)] / (2 * eps)
            errors.append(float((analytic - numeric).norm() / numeric.norm().clamp_min(1e-12)))
        worst = max(worst, min(errors))
    return worst


def _output(owner: Any, tower: Tower, base: Any, step: Tensor) -> Tensor:
    """The owner's output ``[E]`` at the input moved by ``step`` (at the token embeddings, or the pixels)."""
    if isinstance(tower, TextTower):
        ids, mask = base
        return owner.forward({"text.input_ids": ids, "text.attention_mask": mask},
                             add={tower.grad_port: step.unsqueeze(0)}, outputs=[tower.output])[tower.output][0]
    return owner.forward({tower.grad_port: base + step.unsqueeze(0)}, outputs=[tower.output])[tower.output][0]
