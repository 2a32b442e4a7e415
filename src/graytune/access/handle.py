"""What every backbone handle offers, in process or over the network (a ``Protocol``),
and the one autograd node both kinds of handle use to cross the boundary.

Client code (the adapted model, training, evaluation) is written against this,
so the same adapter trains on a ``LocalHandle`` and on a ``RemoteHandle``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch
from torch import nn

from graytune.access.checks import CallPlan
from graytune.types import AccessLevel, BackboneSpec, Exposure

Tensor = torch.Tensor


class Handle(Protocol):
    """A backbone behind the boundary at one access level."""

    access: AccessLevel
    spec: BackboneSpec
    exposure: Exposure

    @property
    def grants(self) -> frozenset[str]: ...

    @property
    def fingerprint(self) -> str: ...

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]: ...

    def forward(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                reads: Sequence[str] = ()) -> dict[str, Tensor]: ...

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor: ...

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor: ...

    def module(self) -> nn.Module: ...

    def with_module(self, module: nn.Module) -> Handle: ...


class BoundaryRun(Protocol):
    """One checked call across the boundary: its forward now, its VJP later (in process or on a server)."""

    plan: CallPlan
    values_read: dict[str, Tensor]

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]: ...

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]: ...


class _Crossing(torch.autograd.Function):
    """The autograd node standing for the hidden backbone; its backward is the run's VJP."""

    @staticmethod
    def forward(ctx, call: BoundaryRun, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.call = call
        ctx.set_materialize_grads(False)
        return call.forward(tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *ctx.call.vjp(grads))


def cross(call: BoundaryRun) -> dict[str, Tensor]:
    """Run ``call``'s forward as one autograd node (when a client tensor wants a gradient).

    Returns:
        ``{port name: tensor}`` for each output, then each port read.
    """
    plan = call.plan
    diff = [plan.tensor(group, port) for group, port in plan.slots]
    values = _Crossing.apply(call, *diff) if diff else call.forward(())
    result = dict(zip(plan.outputs, values))
    result.update(call.values_read)
    return result
