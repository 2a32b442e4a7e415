"""The owner's side of the boundary: one call through the hidden backbone, kept until its backward.

The in-process handle drives a ``BoundaryCall`` through an autograd node; the server
drives it by hand (``forward`` on one request, ``vjp`` on a later one) and keeps it
in its session store, sized by ``graph_bytes``. Under ``deadline(at)`` the backbone's
work stops at its next torch operation (forward) or graph node (backward) after ``at``
with ``DeadlineExceeded``, so a server frees its backbone soon after a request's deadline.

Example:
    >>> call = handle.open_call(handle.plan({"text": ["a cat"]}, {"text.token_embeds": shift}, {}, None, []),
    ...                         measure=True)
    >>> (z,) = call.forward([shift])             # z: [1, E]; call.nbytes: what its graph holds
    >>> (g_shift,) = call.vjp([torch.ones_like(z)])
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from graytune.access.checks import CallPlan, all_finite
from graytune.backbones.base import Backbone, recomputing
from graytune.devices import dtype_name
from graytune.errors import GraytuneError, InvalidInputError, NumericalError
from graytune.types import Exposure

Tensor = torch.Tensor
_active = threading.local()  # the deadline of the work running on this thread, if any


class DeadlineExceeded(GraytuneError):
    """Backbone work stopped at a safe point because its deadline passed."""


#: calls that only set or read this thread's autograd mode: a context manager's ``__exit__`` makes them while
#: unwinding, and raising there would leave the mode changed for every later request on the thread
_MODE_CALLS = frozenset({torch._C._set_grad_enabled, torch.is_grad_enabled, torch.set_grad_enabled,
                         torch._C.is_grad_enabled})


class _StopAt(TorchFunctionMode):
    """Raises ``DeadlineExceeded`` at the first torch operation after ``at`` (``time.monotonic()``).

    Calls that set or read the autograd mode always run, so no ``with torch.no_grad()`` (or
    ``set_grad_enabled``) inside the stopped work fails to restore the mode it changed.
    """

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func not in _MODE_CALLS:
            _check(self.at)
        return func(*args, **(kwargs or {}))


def _check(at: float) -> None:
    if time.monotonic() > at:
        raise DeadlineExceeded("the work ran past its deadline and was stopped")


@contextlib.contextmanager
def deadline(at: float | None) -> Iterator[None]:
    """Stop the backbone work run on this thread inside the block soon after ``at`` (``time.monotonic()``).

    The forward stops at its next torch operation, a ``BoundaryCall.vjp`` at its next graph
    node; both raise ``DeadlineExceeded``. ``None`` sets no deadline. The thread leaves the block
    with the autograd mode it entered with, however the work ended: a server's worker threads are
    shared by every client, so one stopped request must not change how the next one is served.

    Example:
        >>> with deadline(time.monotonic() + 5.0):
        ...     (z,) = call.forward([shift])
    """
    if at is None:
        yield
        return
    previous = getattr(_active, "at", None)
    grad_mode = torch.is_grad_enabled()
    _active.at = at
    try:
        with _StopAt(at):
            yield
    finally:
        _active.at = previous
        torch.set_grad_enabled(grad_mode)


def weight_storages(module: nn.Module) -> frozenset[int]:
    """The storages (data pointers) of ``module``'s parameters and buffers.

    Computed once per handle: every call's graph shares them, so no session is charged for them.
    """
    return frozenset(t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()])


class BoundaryCall:
    """One forward through the boundary, kept until its backward (owner side).

    Client tensors cross into the backbone's device and dtype; outputs and VJPs come back
    in float32 on the backbone's device (the handle moves them to the client's).

    Args:
        backbone: the owner's backbone.
        plan: the checked request (``plan_call``).
        exposure: the record this call's gradient query is noted in.
        measure: count the bytes the graph keeps for the backward (``nbytes``), as the server does.
        shared: storages not to count (the owner's weights, from ``weight_storages``).
        device, dtype: where the backbone's module lives and its floating dtype.
        recompute: keep only each layer's inputs and recompute the layers inside the VJP.
    """

    def __init__(self, backbone: Backbone, plan: CallPlan, exposure: Exposure, measure: bool = False,
                 shared: frozenset[int] = frozenset(), device: torch.device = torch.device("cpu"),
                 dtype: torch.dtype = torch.float32, recompute: bool = False) -> None:
        self.backbone, self.plan, self.exposure, self.measure = backbone, plan, exposure, measure
        self.shared, self.device, self.dtype, self.recompute = shared, device, dtype, recompute
        self.values_read: dict[str, Tensor] = {}
        self.nbytes = 0  # what this call holds until its backward (counted when ``measure``)
        self.output_shapes: dict[str, list[int]] = {}
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None

    @property
    def differentiable(self) -> bool:
        return bool(self.plan.slots)

    def inward(self, tensor: Tensor) -> Tensor:
        """``tensor`` on the backbone's device, floating values in its dtype (no copy when already there)."""
        if tensor.is_floating_point():
            return tensor.to(self.device, self.dtype)
        return tensor.to(self.device)

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        """The outputs (detached, float32) for the client tensors at ``plan.slots``; the graph is kept for ``vjp``."""
        plan = self.plan
        groups = {group: {port: self.inward(t) for port, t in values.items()}
                  for group, values in (("inputs", plan.inputs), ("add", plan.add), ("insert", plan.insert))}
        leaves = []
        for (group, port), tensor in zip(plan.slots, tensors):
            leaf = self.inward(tensor.detach()).requires_grad_(True)
            groups[group][port] = leaf
            leaves.append(leaf)
        with torch.set_grad_enabled(bool(leaves)), recomputing(self.recompute) as kept:
            result = self.backbone.run(groups["inputs"], groups["add"], groups["insert"], plan.outputs, plan.reads,
                                       **top_k_of(plan))
        outs = [result[name] for name in plan.outputs]
        self._check_finite("forward", dict(zip(plan.outputs, outs)))
        self.output_shapes = {name: list(o.shape) for name, o in zip(plan.outputs, outs)}
        self.values_read = {name: _read_value(result[name]) for name in plan.reads}
        if leaves:
            self._graph = (outs, leaves)
            if self.measure:
                self.nbytes = graph_bytes(outs, self.shared, kept)
        return tuple(o.detach().float() for o in outs)

    def _check_finite(self, where: str, values: dict[str, Tensor | None]) -> None:
        """In half precision, values that overflowed are the owner's precision, not the client's input."""
        if self.dtype == torch.float32:
            return
        bad = [name for name, v in values.items() if v is not None and not all_finite(v)]
        if bad:
            raise NumericalError(
                f"the backbone's {where} in {dtype_name(self.dtype)} gave NaN or infinite values at "
                f"{', '.join(bad)}, from finite inputs: half precision overflowed; the owner can run it in "
                f"{'bf16 (fp32 range)' if self.dtype == torch.float16 else 'fp32'}, or send smaller values")

    def check_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Each output's gradient (or None): float32, the output's shape once known, finite values."""
        shapes = self.output_shapes
        for name, g in zip(self.plan.outputs, grads):
            if g is None:
                continue
            if g.dtype != torch.float32 or (name in shapes and list(g.shape) != shapes[name]):
                raise InvalidInputError(f"the gradient for {name} has shape {list(g.shape)} ({g.dtype}); "
                                        f"the output has shape {shapes.get(name)} (float32)")
            if not all_finite(g):
                raise InvalidInputError(f"the gradient sent back to {name} has NaN or infinite values")

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        """The gradient at each client tensor of ``plan.slots`` for the outputs' ``grads``; once per forward."""
        if self._graph is None:
            raise InvalidInputError("this boundary call was already differentiated once; run forward again")
        outs, leaves = self._graph
        self._graph = None
        self.nbytes = 0
        for name, g in zip(self.plan.outputs, grads):
            if g is not None and not all_finite(g):
                raise InvalidInputError(f"the gradient sent back to {name} has NaN or infinite values")
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        self.exposure.gradient_queries += 1
        self.exposure.gradient_samples += self.plan.batch
        if not pairs:
            return tuple(None for _ in leaves)
        at = getattr(_active, "at", None)
        if at is not None:  # each node checks the deadline before it runs
            for node in _nodes([o for o, _ in pairs]):
                node.register_prehook(lambda _grads, at=at: _check(at))
        sent = [g.to(self.device, torch.float32) for _, g in pairs]
        scale = _fp16_scale(sent) if self.dtype == torch.float16 else 1.0
        vjps = torch.autograd.grad([o for o, _ in pairs], leaves, [(g * scale).to(self.dtype) for g in sent],
                                   allow_unused=True)
        vjps = tuple(None if v is None else v.float() / scale for v in vjps)
        self._check_finite("backward (VJP)", {f"the gradient at {port}": v
                                              for (_, port), v in zip(self.plan.slots, vjps)})
        return vjps


def top_k_of(plan: CallPlan) -> dict[str, int]:
    """``{"top_k": k}`` for a backbone's ``run`` when ``plan`` reads the next tokens (``access.topk``), else ``{}``:
    backbones without a next-token distribution never see the argument."""
    return {"top_k": plan.top_k} if plan.top_k else {}


def _read_value(value: Tensor) -> Tensor:
    """A value read, detached: float32, or int64 for ids (``text.top_ids``)."""
    return value.detach().float() if value.is_floating_point() else value.detach().long()


def _fp16_scale(grads: Sequence[Tensor]) -> float:
    """A power of two that brings the largest incoming gradient to about 1, so fp16 neither flushes small
    gradients to zero nor overflows on large ones (the VJP is divided by it again in float32)."""
    top = max(float(g.abs().max()) for g in grads)
    if top == 0.0:
        return 1.0
    return float(2.0 ** -round(torch.log2(torch.tensor(top)).item()))


def graph_bytes(outs: Sequence[Tensor], shared: Collection[int] = (), kept: Sequence[Tensor] = ()) -> int:
    """The bytes of the tensors ``outs``' graph saved for the backward (each storage once, ``shared`` not).

    Walks the graph's nodes rather than installing saved-tensor hooks: a pack hook
    that returns the tensor makes a cycle through C++ for every saved output, and
    those graphs would never be freed. Inside recomputed (checkpointed) layers nothing
    is saved; what those layers keep are their inputs, ``kept``.
    """
    seen = set(shared)
    total = 0
    for t in [*kept, *(t for node in _nodes(outs) for t in _saved_tensors(node))]:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def _nodes(outs: Sequence[Tensor]) -> list[Any]:
    """Every autograd node ``outs`` depend on, each once."""
    found, visited = [], set()
    stack = [o.grad_fn for o in outs]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        found.append(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _saved_tensors(node: object) -> list[Tensor]:
    """The tensors ``node`` saved for its backward; those a checkpoint will recompute are not there yet."""
    found = []
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            raw = getattr(node, "_raw" + name)
            if any(r.unpack_hook is not None for r in (raw if isinstance(raw, tuple | list) else (raw,))):
                continue  # a checkpoint's placeholder: reading it would recompute the layer
        except (AttributeError, RuntimeError):
            pass
        try:
            value = getattr(node, name)
        except RuntimeError:  # already freed, or not a tensor
            continue
        found.extend(t for t in (value if isinstance(value, tuple | list) else (value,)) if isinstance(t, Tensor))
    return found
