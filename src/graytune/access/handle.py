"""What every backbone handle offers, in process or over the network (a ``Protocol``),
and the one autograd node both kinds of handle use to cross the boundary.

Client code (the adapted model, training, evaluation) is written against this,
so the same adapter trains on a ``LocalHandle`` and on a ``RemoteHandle``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from graytune.access.checks import CallPlan, client_device
from graytune.access.generation import Generated
from graytune.types import AccessLevel, BackboneSpec, Exposure, GenerationSettings

if TYPE_CHECKING:  # images.py builds on the access layer; only the annotation is needed here
    from graytune.access.images import ImageSettings

Tensor = torch.Tensor


class Handle(Protocol):
    """A backbone behind the boundary at one access level."""

    access: AccessLevel
    spec: BackboneSpec
    exposure: Exposure
    device: torch.device  # where results land when a request holds no client tensor

    @property
    def grants(self) -> frozenset[str]: ...

    @property
    def top_k_grant(self) -> int: ...

    @property
    def fingerprint(self) -> str: ...

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]: ...

    def forward(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                insert: Mapping[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                reads: Sequence[str] = (), top_k: int = 0) -> dict[str, Tensor]: ...

    def generate(self, inputs: Mapping[str, Tensor | Sequence[str]], *, add: Mapping[str, Tensor] | None = None,
                 insert: Mapping[str, Tensor] | None = None, maps: Mapping[str, Mapping[str, Tensor]] | None = None,
                 settings: GenerationSettings | Mapping[str, object] | None = None,
                 stream: Callable[[list[str]], None] | None = None) -> Generated: ...

    def generate_images(self, inputs: Mapping[str, Tensor | Sequence[str]], *,
                        add: Mapping[str, Tensor] | None = None, insert: Mapping[str, Tensor] | None = None,
                        settings: ImageSettings | Mapping[str, object] | None = None) -> Tensor: ...

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor: ...

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor: ...

    def module(self) -> nn.Module: ...

    def with_module(self, module: nn.Module) -> Handle: ...


def encode_image(handle: Handle, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
    """``[B, E]`` image embeddings (not normalised) through ``handle``: every handle's ``encode_image``."""
    return handle.forward({"image.pixels": pixels}, outputs=["image.embeds"], **edits)["image.embeds"]


def encode_text(handle: Handle, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
    """``[B, E]`` text embeddings (not normalised) for strings or tokenized ids: every handle's ``encode_text``."""
    inputs = dict(text) if isinstance(text, Mapping) else {"text": text}
    return handle.forward(inputs, outputs=["text.embeds"], **edits)["text.embeds"]


class BoundaryRun(Protocol):
    """One checked call across the boundary: its forward now, its VJP later (in process or on a server)."""

    plan: CallPlan
    values_read: dict[str, Tensor]

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]: ...

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]: ...


class _Crossing(torch.autograd.Function):
    """The autograd node standing for the hidden backbone; its backward is the run's VJP.

    The VJP at each client tensor comes back on that tensor's device and in its dtype,
    wherever the backbone ran (another device, half precision, another machine).
    """

    @staticmethod
    def forward(ctx, call: BoundaryRun, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.call = call
        ctx.homes = [(t.device, t.dtype) for t in tensors]
        ctx.set_materialize_grads(False)
        return call.forward(tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        vjps = ctx.call.vjp(grads)
        return (None, *(None if v is None else v.to(device, dtype) for v, (device, dtype) in zip(vjps, ctx.homes)))


def cross(call: BoundaryRun, default_device: torch.device | None = None) -> dict[str, Tensor]:
    """Run ``call``'s forward as one autograd node (when a client tensor wants a gradient).

    Results come back in float32 on the device of the client's tensors (``default_device``
    when the request holds none, e.g. text sent as strings; ``None`` leaves them where they are).

    Returns:
        ``{port name: tensor}`` for each output, then each port read.
    """
    plan = call.plan
    diff = [plan.tensor(group, port) for group, port in plan.slots]
    values = _Crossing.apply(call, *diff) if diff else call.forward(())
    result = dict(zip(plan.outputs, values))
    result.update(call.values_read)
    home = client_device(plan, default_device)
    if home is not None:  # a differentiable copy: the gradient goes back to the results' device
        result = {name: value.to(home) for name, value in result.items()}
    return result
