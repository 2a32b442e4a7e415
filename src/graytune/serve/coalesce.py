"""Many clients, one backbone call: forwards and VJPs from any client joined within a short window.

``graytune serve --coalesce-ms W`` (0: off). A forward that finds the backbone idle runs at once; one that finds
it busy waits up to ``W`` ms for others it can share a backbone call with (same level, ports, outputs and edit shapes; texts of different lengths are padded to the longest, under
attention mask 0), and the joined call's outputs are split back by rows. Where gradients were asked, the joined
call keeps one graph and each client gets a session of its own over its rows. Its VJP waits for the other
members' VJPs (after the first arrives, up to ``VJP_WAIT`` windows or twice the joined forward's time, whichever is
longer: the time the members need to answer their forwards), and one backward over the joined graph answers them
all; a member that has not sent its VJP by then gets zero cotangents in that backward, and its
session is dropped, so it gets 410 and resends its forward to be recomputed alone, as after any lost session:
no client's answer waits on a client that went away.

What is shared is only the call: every request is checked, admitted and charged per client before it joins,
and a joined call that fails is run again request by request, so one client's bad request fails only its own.
Requests of more than ``max_rows`` rows, and requests the joiner cannot split (reads, top-k, per-position
outputs, other input ports), run alone as before. Joined groups are formed in arrival order, each at most
``max_rows`` rows, so a client's large batches do not hold back another's small ones for more than a window.

Example:
    >>> joiner = Joiner(service, window_ms=2.0)
    >>> values, call = await joiner.forward(handle, plan, until)      # call: a session's ``MemberCall``
    >>> grads = await joiner.vjp(call, cotangents, until)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from graytune.access import BoundaryCall, CallPlan, LocalHandle
from graytune.errors import InvalidInputError
from graytune.serve.admission import HTTPProblem
from graytune.serve.service import GONE, timed_out

__all__ = ["VJP_WAIT", "Joiner", "MemberCall", "joinable", "run_forward"]
Tensor = torch.Tensor
#: how many windows a joined call's backward waits at least for its members' VJPs after the first arrives (and at
#: least twice the joined forward's time)
VJP_WAIT = 4
#: input ports whose second dimension is token positions, padded to the longest text of a joined call
_TOKEN_PORTS = (".input_ids", ".attention_mask")


def joinable(plan: CallPlan, max_rows: int) -> bool:
    """Whether ``plan`` can share a backbone call: an encoder's embeddings out, token ids or pixels in, at most
    ``max_rows`` rows, nothing read."""
    return (0 < plan.batch <= max_rows and not plan.reads and not plan.top_k
            and all(name.endswith(".embeds") for name in plan.outputs)
            and all(name.endswith((*_TOKEN_PORTS, ".pixels")) for name in plan.inputs))


def _signature(handle: LocalHandle, plan: CallPlan) -> tuple[Any, ...]:
    """Plans with one signature join: the same level, outputs, slots, input dtypes and edit shapes."""
    inputs = tuple(sorted((k, v.dtype, tuple(v.shape[2:] if k.endswith(_TOKEN_PORTS) else v.shape[1:]))
                          for k, v in plan.inputs.items()))
    positions = {int(v.shape[1]) for k, v in plan.inputs.items() if k.endswith(_TOKEN_PORTS)}
    add = tuple(sorted((k, tuple(v.shape[1:])) for k, v in plan.add.items()))
    per_position = any(v.dim() >= 3 and v.shape[1] > 1 for v in plan.add.values())
    insert = tuple(sorted((k, tuple(v.shape[1:])) for k, v in plan.insert.items()))
    return (handle.access, tuple(plan.outputs), tuple(plan.slots), inputs, add, insert,
            tuple(positions) if per_position else None)  # per-position edits join only at one length


def _rows(tensor: Tensor, n: int) -> Tensor:
    """``tensor`` with ``n`` rows: a broadcast row (batch 1) expanded."""
    return tensor.expand(n, *tensor.shape[1:]) if tensor.shape[0] == 1 and n != 1 else tensor


def _pad(tensor: Tensor, length: int) -> Tensor:
    """Token positions padded on the right to ``length`` with zeros (ids 0 under attention mask 0)."""
    if tensor.shape[1] == length:
        return tensor
    pad = tensor.new_zeros((tensor.shape[0], length - tensor.shape[1], *tensor.shape[2:]))
    return torch.cat([tensor, pad], dim=1)


def joined_plan(plans: Sequence[CallPlan]) -> CallPlan:
    """One plan over every row of ``plans`` (one signature): inputs padded and stacked, edits expanded."""
    sizes = [p.batch for p in plans]
    length = max((int(v.shape[1]) for p in plans for k, v in p.inputs.items() if k.endswith(_TOKEN_PORTS)),
                 default=0)
    inputs = {k: torch.cat([_pad(p.inputs[k], length) if k.endswith(_TOKEN_PORTS) else p.inputs[k]
                            for p in plans]) for k in plans[0].inputs}
    add = {k: torch.cat([_rows(p.add[k], n) for p, n in zip(plans, sizes)]) for k in plans[0].add}
    insert = {k: torch.cat([_rows(p.insert[k], n) for p, n in zip(plans, sizes)]) for k in plans[0].insert}
    return replace(plans[0], inputs=inputs, add=add, insert=insert, batch=sum(sizes))


@dataclass
class _Member:
    handle: LocalHandle
    plan: CallPlan
    until: float
    future: asyncio.Future[tuple[tuple[Tensor, ...], Any]]


@dataclass
class _Joint:
    """A joined forward that kept its graph: its members' cotangents, gathered until the backward runs."""

    call: BoundaryCall
    plans: list[CallPlan]
    grads: dict[int, list[Tensor | None]] = field(default_factory=dict)
    waiting: dict[int, asyncio.Future[tuple[Tensor | None, ...]]] = field(default_factory=dict)
    members: list[MemberCall] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    done: bool = False
    wait_s: float = 0.0  # how long the backward waits for the members' VJPs after the first one arrives


class MemberCall:
    """One client's rows of a joined call, kept in the session store as a ``BoundaryCall`` is."""

    def __init__(self, joint: _Joint, index: int, plan: CallPlan, output_shapes: dict[str, list[int]],
                 nbytes: int) -> None:
        self.joint, self.index, self.plan = joint, index, plan
        self.output_shapes, self.nbytes, self.values_read = output_shapes, nbytes, {}
        self.forget: Callable[[], None] = lambda: None  # drops this member's session (set by the route)

    @property
    def differentiable(self) -> bool:
        return bool(self.plan.slots)

    def check_grads(self, grads: Sequence[Tensor | None]) -> None:
        for name, g in zip(self.plan.outputs, grads):
            if g is not None and (g.dtype != torch.float32 or list(g.shape) != self.output_shapes[name]):
                raise InvalidInputError(f"the gradient for {name} has shape {list(g.shape)} ({g.dtype}); the output "
                                        f"has shape {self.output_shapes[name]} (float32)")


class Joiner:
    """The pending forwards and VJPs of one server process (event loop only), and the calls they share."""

    def __init__(self, service: Any, window_ms: float, max_rows: int = 64) -> None:
        self.service, self.window_s, self.max_rows = service, window_ms / 1000, max_rows
        self._pending: dict[tuple[Any, ...], list[_Member]] = {}
        self.eager = True  # a forward that finds the backbone idle runs at once (False: it always waits a window)
        self.calls = self.joined = 0  # backbone calls made here, and requests that shared one with another
        self.largest = 0  # the most rows one call made here held

    async def forward(self, handle: LocalHandle, plan: CallPlan, until: float) -> tuple[tuple[Tensor, ...], Any]:
        """The outputs of ``plan`` and the call a VJP differentiates (a ``MemberCall`` when it was joined)."""
        if not joinable(plan, self.max_rows):
            return await self.service.compute(lambda: run_forward(handle, plan), until)
        loop = asyncio.get_running_loop()
        key = _signature(handle, plan)
        member = _Member(handle, plan, until, loop.create_future())
        waiting = self._pending.get(key)
        if waiting and sum(m.plan.batch for m in waiting) + plan.batch > self.max_rows:
            self._flush(key, waiting)  # full: it goes now, in arrival order, and this request starts the next
        group = self._pending.setdefault(key, [])
        group.append(member)
        if len(group) == 1:  # an idle backbone runs it at once; a busy one gathers company for a window
            delay = 0.0 if self.eager and not self.service.queued else self.window_s
            loop.call_later(delay, self._flush, key, group)
        elif sum(m.plan.batch for m in group) >= self.max_rows:
            self._flush(key, group)
        return await _within(member.future, until, self.service)

    def _flush(self, key: tuple[Any, ...], group: list[_Member]) -> None:
        if self._pending.get(key) is not group:
            return  # flushed already (it filled up before its window ended)
        del self._pending[key]
        self.largest = max(self.largest, sum(m.plan.batch for m in group))
        task = asyncio.ensure_future(self._run(group))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _run(self, group: list[_Member]) -> None:
        until = max(m.until for m in group)
        self.calls += 1
        if len(group) == 1:
            await _settle(group[0], self.service.compute(lambda: run_forward(group[0].handle, group[0].plan), until))
            return
        self.joined += len(group)
        plans = [m.plan for m in group]
        timed = [0.0]

        def joined() -> tuple[tuple[Tensor, ...], BoundaryCall]:
            start = time.monotonic()
            try:
                return run_forward(group[0].handle, joined_plan(plans))
            finally:
                timed[0] = time.monotonic() - start

        try:
            values, call = await self.service.compute(joined, until)
        except Exception:  # noqa: BLE001 - each request again on its own: its own error, or its answer
            for m in group:
                await _settle(m, self.service.compute(lambda m=m: run_forward(m.handle, m.plan), m.until))
            return
        joint = _Joint(call, plans, wait_s=max(VJP_WAIT * self.window_s, 2 * timed[0])) if call.differentiable \
            else None
        start = 0
        for index, m in enumerate(group):
            rows = slice(start, start + m.plan.batch)
            start += m.plan.batch
            mine = tuple(v[rows] for v in values)
            if m.future.done():
                continue
            if joint is None:
                m.future.set_result((mine, call))
                continue
            shapes = {name: list(v.shape) for name, v in zip(m.plan.outputs, mine)}
            member = MemberCall(joint, index, m.plan, shapes, call.nbytes * m.plan.batch // max(1, call.plan.batch))
            joint.members.append(member)
            m.future.set_result((mine, member))

    async def vjp(self, member: MemberCall, grads: list[Tensor | None], until: float) -> tuple[Tensor | None, ...]:
        """``member``'s gradients, from one backward over its joined call once the members' cotangents are in."""
        joint, loop = member.joint, asyncio.get_running_loop()
        if joint.done:  # its backward ran without this member (it came too late): recompute alone
            raise HTTPProblem(410, *GONE)
        joint.grads[member.index] = grads
        future: asyncio.Future[tuple[Tensor | None, ...]] = loop.create_future()
        joint.waiting[member.index] = future
        if len(joint.grads) == len(joint.members):
            self._backward(joint, until)
        elif joint.timer is None:
            joint.timer = loop.call_later(joint.wait_s, self._backward, joint, until)
        return await _within(future, until, self.service)

    def _backward(self, joint: _Joint, until: float) -> None:
        if joint.done:
            return
        joint.done = True
        if joint.timer is not None:
            joint.timer.cancel()
        for member in joint.members:
            if member.index not in joint.grads:
                member.forget()  # its VJP comes later: 410, and its forward is recomputed alone
        task = asyncio.ensure_future(self._answer(joint, until))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _answer(self, joint: _Joint, until: float) -> None:
        cotangents = _joined_grads(joint)
        try:
            result = await self.service.compute(lambda: joint.call.vjp(cotangents), until)
        except BaseException as err:
            for future in joint.waiting.values():
                if not future.done():
                    future.set_exception(err)
            raise
        start = 0
        for plan, member in zip(joint.plans, joint.members):
            rows = slice(start, start + plan.batch)
            start += plan.batch
            future = joint.waiting.get(member.index)
            if future is not None and not future.done():
                future.set_result(tuple(None if g is None else _own(g[rows], plan.tensor(*slot))
                                        for g, slot in zip(result, plan.slots)))


def _joined_grads(joint: _Joint) -> list[Tensor | None]:
    """Each output's cotangent over the joined rows: a member's own, zeros for one that sent none."""
    out: list[Tensor | None] = []
    for position, name in enumerate(joint.plans[0].outputs):
        parts, any_sent = [], False
        for plan, member in zip(joint.plans, joint.members):
            sent = joint.grads.get(member.index)
            g = sent[position] if sent is not None else None
            any_sent = any_sent or g is not None
            parts.append(g if g is not None else torch.zeros(member.output_shapes[name]))
        out.append(torch.cat(parts) if any_sent else None)
    return out


def _own(grad: Tensor, sent: Tensor) -> Tensor:
    """The gradient at a client's tensor from its rows of the joined one: summed back over a broadcast row and
    cut to its own token positions."""
    if sent.shape[0] == 1 and grad.shape[0] != 1:
        grad = grad.sum(dim=0, keepdim=True)
    if grad.dim() >= 2 and sent.dim() >= 2 and grad.shape[1] != sent.shape[1]:
        grad = grad[:, :sent.shape[1]]
    return grad


async def _within(future: asyncio.Future[Any], until: float, service: Any) -> Any:
    """``future``'s result by ``until`` (``time.monotonic()``): 504 past it, as ``Service.compute`` answers."""
    try:
        return await asyncio.wait_for(future, max(0.0, until - time.monotonic()))
    except TimeoutError:
        raise timed_out(service.config.request_timeout_s) from None


def run_forward(handle: LocalHandle, plan: CallPlan) -> tuple[tuple[Tensor, ...], BoundaryCall]:
    """The forward of a checked ``plan``, measured, and the call that keeps it for a VJP (backbone thread)."""
    call = handle.open_call(plan, measure=True)
    return call.forward([plan.tensor(g, p) for g, p in plan.slots]), call


async def _settle(member: _Member, work: Any) -> None:
    try:
        result = await work
    except BaseException as err:  # noqa: BLE001 - handed to that request's route
        if not member.future.done():
            member.future.set_exception(err)
        return
    if not member.future.done():
        member.future.set_result(result)
