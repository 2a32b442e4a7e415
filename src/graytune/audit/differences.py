"""The finite-difference Jacobian: a whole Jacobian at a black-box boundary, from edits and no gradient.

Black-box lets a client ``add`` at ``text.token_embeds`` without asking a gradient (what zeroth-order
input adapters send). Send one text as many times as there are input coordinates, twice: each copy
carries ``+ε`` or ``−ε`` on one coordinate (one position, one embedding dimension) of its token
embeddings; the output differences ``(f(x + ε eᵢ) − f(x − ε eᵢ)) / 2ε`` are the Jacobian's columns, all
``L x D`` of them, in forwards alone. The rows go out in calls of at most ``POSITIONS`` token positions
(graytune serve's default ``--max-tokens``), so a 14-token text on MiniLM (``2 x 14 x 384`` rows) takes 10
calls. For images the pixels are the raw input and the same differences need no edit at all
(``PIXELS`` per call, ``--max-pixels``).

Scored against the exact Jacobian the owner computes through dark-gray VJPs (duplicate rows, one-hot
cotangents): ``relative_error`` = ``‖J_fd − J‖ / ‖J‖`` and the worst column's. Those are the owner's
evaluation calls, never charged to the attack. A server that refuses edits at black-box (or a quota)
stops the attack, and the report says so.

Example:
    >>> found = finite_difference_jacobian(handle, tower, ["a cat"], owner, budget=1000, epsilon=1e-2)
    >>> found["status"], found["spent"]["calls"], found["relative_error"]
    ('recovered', 10, 0.0004)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from graytune.audit.data import Items
from graytune.audit.jacobian import exact_jacobian
from graytune.audit.meter import CallMeter
from graytune.audit.towers import TextTower, Tower
from graytune.errors import RemoteError
from graytune.types import AccessLevel

log = logging.getLogger(__name__)
Tensor = torch.Tensor
POSITIONS = 16384  # graytune serve's default --max-tokens (positions per call without gradients)
PIXELS = 6422528  # graytune serve's default --max-pixels
MAX_BYTES = 512 * 2**20  # the most Jacobian the attack keeps (images at a large --image-size)


def finite_difference_jacobian(handle: Any, tower: Tower, item: Items, owner: Any | None, budget: int,
                               epsilon: float) -> dict[str, Any]:
    """The Jacobian ``[E, *input]`` of ``tower``'s output at one ``item``, by central differences, no gradient."""
    meter = CallMeter(handle, budget)
    base = tower.prepare(item)
    text = isinstance(tower, TextTower)
    shape = (int(base[0].shape[1]), tower.dim) if text else tuple(base.shape[1:])  # type: ignore[union-attr,index]
    columns = int(torch.tensor(shape).prod())
    width = shape[0] if text else shape[1] * shape[2]
    pairs = max(1, ((POSITIONS if text else PIXELS) // width) // 2)
    if columns * tower.out_dim * 4 > MAX_BYTES:
        return {"status": "not run", "reason": f"the Jacobian would pass {MAX_BYTES // 2**20} MiB",
                "spent": meter.spent()}
    found, stopped, started = torch.zeros(tower.out_dim, columns), None, time.monotonic()
    done = 0
    while done < columns:
        if not meter.afford(1):
            stopped = f"the budget of {budget} calls ran out"
            break
        chunk = torch.arange(done, min(columns, done + pairs))
        try:
            found[:, chunk] = _columns(handle, tower, base, shape, chunk, epsilon).T
        except RemoteError as err:
            if err.status not in (403, 429):
                raise
            stopped = str(err)
            log.warning("the finite-difference Jacobian stopped after %d calls: %s", meter.calls, err)
            break
        done += len(chunk)
    result: dict[str, Any] = {
        "status": "recovered" if done == columns else ("refused" if stopped and "403" in stopped else "partial"),
        "epsilon": epsilon, "rows_per_call": 2 * pairs, "columns": done, "columns_needed": columns,
        "jacobian_shape": [tower.out_dim, *shape], "spent": meter.spent(), "stopped": stopped,
        "seconds": round(time.monotonic() - started, 1),
        "gradient_calls": meter.vjps,
        "edits": (f"add at {tower.grad_port} with no gradient asked" if text else
                  "none: the pixels are the raw input, moved by ±ε")}
    if done:
        result.update(_scored(owner, tower, base, found[:, :done], shape))
    if hasattr(handle, "stats"):
        stats = handle.stats()
        result["server_counted"] = {k: v for k, v in stats.items() if "edit" in k or k.startswith("samples")}
    return result


def _columns(handle: Any, tower: Tower, base: Any, shape: tuple[int, ...], chunk: Tensor, epsilon: float) -> Tensor:
    """Jacobian columns ``[len(chunk), E]`` from one forward over ``2 x len(chunk)`` edited copies of ``base``."""
    n = len(chunk)
    edit = torch.zeros(2 * n, *shape)
    flat = edit.view(2 * n, -1)
    flat[torch.arange(n), chunk] = epsilon
    flat[n + torch.arange(n), chunk] = -epsilon
    with torch.no_grad():
        out = tower.forward(handle, tower.repeat(base, 2 * n), edit).float()
    return (out[:n] - out[n:]) / (2 * epsilon)


def _scored(owner: Any | None, tower: Tower, base: Any, found: Tensor, shape: tuple[int, ...]) -> dict[str, Any]:
    """The relative error against the owner's exact Jacobian (dark-gray VJPs), or a note where it has none."""
    if owner is None or owner.access < AccessLevel.DARK_GRAY:
        return {"note": "unscored: the owner's handle here takes no VJP (audit dark-gray too, or in process)"}
    exact = exact_jacobian(owner, tower, base).reshape(tower.out_dim, -1)[:, :found.shape[1]]  # [E, columns]
    column_error = (found - exact).norm(dim=0) / exact.norm(dim=0).clamp_min(1e-12)
    return {"relative_error": round(float((found - exact).norm() / exact.norm().clamp_min(1e-12)), 6),
            "worst_column_error": round(float(column_error.max()), 6),
            "median_column_error": round(float(column_error.median()), 6),
            "compared_with": "the exact Jacobian from the owner's dark-gray VJPs (duplicate rows, one-hot cotangents)"}
