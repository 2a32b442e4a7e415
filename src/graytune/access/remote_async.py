"""Forwards in flight: the asynchronous methods of ``RemoteHandle`` (``submit``, ``forward_chunks``,
``forward_backward``), bound to it in ``graytune.access.remote``.

A request is checked when it is made, so a mistake raises at once, never later from a future; it then
goes out on the handle's pool of ``max_in_flight`` threads (4 by default) and its tensors are read then
(an in-place update afterwards does not change what was sent). Results are differentiable as
``forward``'s: ``.backward()`` asks the server for the VJP.

- ``submit``: one forward's ``Future``; several may be in flight at once (other batches, evaluation).
- ``forward_chunks``: one batch as row chunks, all in flight at once, joined into ``forward``'s result;
  its backward sends every chunk's VJP at once. Any loss works; it hides transfer time (large batches,
  a thin link), not round trips, since the loss needs every row before a VJP can leave.
- ``forward_backward``: a training step whose loss is a sum over row chunks. Each chunk's VJP leaves as
  soon as its loss is known, while the server still runs later chunks' forwards, so a step pays about
  one round trip of the link instead of two.

Each chunk costs the server a call of its own, so ``chunks`` defaults to 2: over a 50 ms link, 2 chunks hid a
round trip at no measurable cost on the loopback step, 4 hid no more and cost more (``bench.remote_latency``).

Example:
    >>> futures = [h.submit({"text": batch}, add={"text.token_embeds": shift}) for batch in batches]
    >>> embeds = [f.result()["text.embeds"] for f in futures]
    >>> loss = h.forward_backward({"text": texts}, lambda out, rows: ce(head(out["text.embeds"]), y[rows],
    ...                           reduction="sum") / len(y), add={"text.token_embeds": shift})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, as_completed, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from graytune.access.checks import CallPlan
from graytune.access.handle import BoundaryRun, client_device, cross
from graytune.errors import InvalidInputError, RemoteError

#: the handle and its calls, typed loosely: ``graytune.access.remote`` imports this module to bind these methods,
#: so importing it back, even for type checking only, would make an import cycle
RemoteHandle = Any
_RemoteCall = Any

Tensor = torch.Tensor
T = TypeVar("T")
#: a chunk's loss from its outputs (``{port: [b, ...]}``) and its rows of the batch
LossFn = Callable[[dict[str, Tensor], slice], Tensor]


def submit(handle: RemoteHandle, inputs: Mapping[str, Tensor | Sequence[str]], *,
           add: Mapping[str, Tensor] | None = None, insert: Mapping[str, Tensor] | None = None,
           outputs: Sequence[str] | None = None, reads: Sequence[str] = (), top_k: int = 0,
           ) -> Future[dict[str, Tensor]]:
    """As ``forward``, without waiting: the request is checked now (errors raise here) and sent on the
    handle's pool; strings are tokenized now (one round trip: send ids from ``tokenize`` to skip it).

    Example:
        >>> future = h.submit({"text": ["a cat"]}, add={"text.token_embeds": shift})
        >>> future.result()["text.embeds"].sum().backward()   # the VJP, as after forward

    Returns:
        A future of ``forward``'s result, ``{port: tensor}``; differentiable when grad mode was on at submit.
    """
    call = handle._call(handle._plan(inputs, add, insert, outputs, reads, top_k))
    grad_mode = torch.is_grad_enabled()  # thread-local: the worker runs in the caller's mode

    def run() -> dict[str, Tensor]:
        with torch.set_grad_enabled(grad_mode):
            return cross(call)

    return handle._pool().submit(run)


def forward_chunks(handle: RemoteHandle, inputs: Mapping[str, Tensor | Sequence[str]], *, chunks: int = 2,
                   add: Mapping[str, Tensor] | None = None, insert: Mapping[str, Tensor] | None = None,
                   outputs: Sequence[str] | None = None, reads: Sequence[str] = (), top_k: int = 0,
                   ) -> dict[str, Tensor]:
    """As ``forward``, the batch sent as ``chunks`` row chunks in flight at once (at most one per row).

    Example:
        >>> z = h.forward_chunks({"text": texts}, chunks=4, add={"text.token_embeds": shift})["text.embeds"]
        >>> loss_of(z).backward()   # the 4 chunks' VJPs go out at once

    Returns:
        ``forward``'s result (``[B, ...]`` per port); one autograd node over all chunks.
    """
    plan = handle._plan(inputs, add, insert, outputs, reads, top_k)
    parts = split_plan(plan, chunks)
    _count_chunks(handle, len(parts.rows))
    return cross(ChunkedCall(plan, parts, [handle._call(p) for p in parts.plans], handle._pool()))


def forward_backward(handle: RemoteHandle, inputs: Mapping[str, Tensor | Sequence[str]], loss_fn: LossFn, *,
                     chunks: int = 2, add: Mapping[str, Tensor] | None = None,
                     insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                     reads: Sequence[str] = (), top_k: int = 0) -> Tensor:
    """One training step's forward and backward, pipelined: the batch goes out as ``chunks`` row chunks at
    once; as each chunk's outputs arrive, ``loss_fn(outputs, rows)`` gives its loss, its backward runs here
    and its VJP leaves while later chunks still run on the server.

    The step's loss is the sum of the chunks' (scale a mean yourself: ``... .sum() / B``); afterwards every
    tensor it depends on holds its gradient, as after ``forward`` and ``loss.backward()``. For a loss that
    mixes rows (a contrastive one), use ``forward_chunks``.

    Example:
        >>> def loss_fn(out, rows):
        ...     return F.cross_entropy(head(out["text.embeds"]), labels[rows], reduction="sum") / len(labels)
        >>> loss = h.forward_backward({"text": texts}, loss_fn, add={"text.token_embeds": shift})
        >>> optimizer.step()

    Returns:
        The step's loss (detached, a scalar).
    """
    plan = handle._plan(inputs, add, insert, outputs, reads, top_k)
    parts = split_plan(plan, chunks)
    _count_chunks(handle, len(parts.rows))
    calls, pool, home = [handle._call(p) for p in parts.plans], handle._pool(), client_device(plan, None)
    pending = {pool.submit(call.forward, ()): i for i, call in enumerate(calls)}
    vjps: list[Future[tuple[Tensor | None, ...]] | None] = [None] * len(calls)
    losses = []
    try:
        for done in as_completed(pending):
            i = pending[done]
            loss, grads = _chunk_loss(plan, calls[i], done.result(), parts.rows[i], loss_fn, home)
            losses.append(loss)
            if plan.slots:
                vjps[i] = pool.submit(calls[i].vjp, grads)
    except BaseException:
        wait(pending)
        _release([call for call, vjp in zip(calls, vjps) if vjp is None])
        raise
    finally:
        wait([f for f in [*pending, *vjps] if f is not None])  # nothing left running into the next step
    if plan.slots:
        joined = parts.join([f.result() for f in vjps if f is not None])
        roots = [(plan.tensor(*slot), v) for slot, v in zip(plan.slots, joined) if v is not None]
        if roots:  # the edits' own graphs (an adapter's parameters), as the autograd node's backward would
            torch.autograd.backward([t for t, _ in roots], [v.to(t.device, t.dtype) for t, v in roots])
    return torch.stack(losses).sum()


def _chunk_loss(plan: CallPlan, call: BoundaryRun, values: Sequence[Tensor], rows: slice, loss_fn: LossFn,
                home: torch.device | None) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """``loss_fn`` on one chunk's outputs, its backward run here: the loss (detached) and the outputs' gradients."""
    outs = [v.to(home) if home is not None else v for v in values]
    if plan.slots:  # leaves: the loss's gradient at each output is what the chunk's VJP needs
        outs = [o.detach().requires_grad_() if o.is_floating_point() else o for o in outs]
    named = dict(zip(plan.outputs, outs))
    named.update({k: v.to(home) if home is not None else v for k, v in call.values_read.items()})
    loss = loss_fn(named, rows)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise InvalidInputError(f"loss_fn must return the chunk's loss as a one-element tensor; it returned {shape}; "
                                "reduce it (e.g. .sum() / batch_size) so the chunks' losses add up to the step's")
    if loss.requires_grad:  # the graph is kept: the loss may reach the edits, whose backward comes at the end
        torch.autograd.backward(loss, retain_graph=True)
    grads = tuple(None if not o.requires_grad else (torch.zeros_like(v) if o.grad is None else o.grad.to(v.device))
                  for o, v in zip(outs, values))
    return loss.detach().reshape(()), grads


@dataclass
class Chunks:
    """A plan cut along its rows: each chunk's rows and plan, and for each of the plan's ``slots`` whether its
    tensor was cut (its VJPs are concatenated) or broadcast over the rows (its VJPs are summed)."""

    rows: list[slice]
    plans: list[CallPlan]
    cut: list[bool]

    def join(self, vjps: Sequence[Sequence[Tensor | None]]) -> tuple[Tensor | None, ...]:
        """The VJP at each slot of the whole plan from the chunks' (``[B, ...]`` cut, ``[1, ...]`` summed)."""
        joined: list[Tensor | None] = []
        for slot, cut in enumerate(self.cut):
            parts = [v[slot] for v in vjps]
            given = [p for p in parts if p is not None]
            if not given:
                joined.append(None)
            elif cut:
                joined.append(torch.cat([given[0].new_zeros((r.stop - r.start, *given[0].shape[1:])) if p is None
                                         else p for p, r in zip(parts, self.rows)]))
            else:
                joined.append(torch.stack(given).sum(0))
        return tuple(joined)


def split_plan(plan: CallPlan, chunks: int) -> Chunks:
    """``plan`` as ``chunks`` plans of consecutive rows, as even as can be (at most one per row).

    Inputs are cut along their rows, edits too where they hold one row per input row (``[B, ...]``);
    broadcast edits (``[1, ...]``) go whole to every chunk.
    """
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise InvalidInputError(f"chunks must be a whole number >= 1; got {chunks!r} (e.g. chunks=4 sends a batch "
                                "of 32 rows as 4 requests of 8)")
    count = max(1, min(chunks, plan.batch))
    bounds = [round(i * plan.batch / count) for i in range(count + 1)]
    rows = [slice(a, b) for a, b in zip(bounds, bounds[1:])]

    def per_row(t: Tensor) -> bool:
        return count > 1 and t.dim() > 0 and t.shape[0] == plan.batch

    with torch.no_grad():
        plans = [CallPlan({k: v[r] for k, v in plan.inputs.items()},
                          {k: v[r] if per_row(v) else v for k, v in plan.add.items()},
                          {k: v[r] if per_row(v) else v for k, v in plan.insert.items()},
                          list(plan.outputs), list(plan.reads), list(plan.slots), r.stop - r.start, plan.top_k)
                 for r in rows]
    return Chunks(rows, plans, [group == "inputs" or per_row(plan.tensor(group, port)) for group, port in plan.slots])


class ChunkedCall:
    """One call run as row chunks on the server (a ``BoundaryRun``): the chunks' forwards in flight at once,
    then their VJPs, joined as one call's."""

    def __init__(self, plan: CallPlan, chunks: Chunks, calls: Sequence[_RemoteCall], pool: Executor) -> None:
        self.plan, self.chunks, self.calls, self.pool = plan, chunks, list(calls), pool
        self.values_read: dict[str, Tensor] = {}

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        try:
            results = _settle([self.pool.submit(call.forward, ()) for call in self.calls])
        except BaseException:
            _release(self.calls)  # the chunks that were answered: no VJP will come for them
            raise
        names = [*self.plan.outputs, *self.plan.reads]
        parts = [[*values, *(call.values_read[n] for n in self.plan.reads)]
                 for values, call in zip(results, self.calls)]
        joined = [_rows(name, [p[i] for p in parts], self.chunks.rows) for i, name in enumerate(names)]
        self.values_read = dict(zip(self.plan.reads, joined[len(self.plan.outputs):]))
        return tuple(joined[:len(self.plan.outputs)])

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        per_chunk = [tuple(None if g is None else g[r] for g in grads) for r in self.chunks.rows]
        return self.chunks.join(_settle([self.pool.submit(c.vjp, g) for c, g in zip(self.calls, per_chunk)]))


def _rows(name: str, parts: Sequence[Tensor], rows: Sequence[slice]) -> Tensor:
    """The chunks' values at ``name`` joined along the rows; an error if one is not one row per input row."""
    for part, r in zip(parts, rows):
        if part.dim() == 0 or part.shape[0] != r.stop - r.start:
            raise RemoteError(0, "chunks", f"{name} came back as {tuple(part.shape)} for a chunk of "
                              f"{r.stop - r.start} rows, not one row per input row; send this call with forward")
    return torch.cat(list(parts))


def _settle(futures: Sequence[Future[T]]) -> list[T]:
    """Every future's result once all are done (none left running); the first error raised."""
    wait(futures)
    return [f.result() for f in futures]


def _release(calls: Sequence[_RemoteCall]) -> None:
    """Free on the server the sessions of ``calls`` whose VJP will never be asked (best effort)."""
    for call in calls:
        call._release()


def _count_chunks(handle: RemoteHandle, count: int) -> None:
    """The exposure counts each chunk as a query of its own, as the server does."""
    with handle._lock:
        handle.exposure.forward_queries += count - 1
