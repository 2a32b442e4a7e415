"""The in-process boundary: a handle that exposes a backbone only at its granted level.

The handle is not an ``nn.Module``: putting it inside a client model adds no
parameters, and nothing it offers below white-box returns a weight. Gradients
cross it as one autograd node whose backward is the vector–Jacobian product at
the client's tensors, so adapters train with any optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from graytune.access.checks import (
    batch_size,
    check_tensor,
    check_token_inputs,
    port_for,
    unknown_input,
)
from graytune.backbones.base import Backbone
from graytune.errors import AccessDeniedError, InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Exposure, Op, PortKind

Tensor = torch.Tensor


@dataclass
class _Call:
    """One forward through the boundary, kept until its backward (owner side)."""

    backbone: Backbone
    inputs: dict[str, Tensor]
    add: dict[str, Tensor]
    insert: dict[str, Tensor]
    outputs: list[str]
    reads: list[str]
    slots: list[tuple[str, str]]  # (group, port) of each differentiable client tensor
    exposure: Exposure
    _graph: tuple[list[Tensor], list[Tensor]] | None = None
    values_read: dict[str, Tensor] = field(default_factory=dict)

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        groups = {"inputs": dict(self.inputs), "add": dict(self.add), "insert": dict(self.insert)}
        leaves = []
        for (group, port), tensor in zip(self.slots, tensors):
            leaf = tensor.detach().requires_grad_(True)
            groups[group][port] = leaf
            leaves.append(leaf)
        with torch.set_grad_enabled(bool(leaves)):
            result = self.backbone.run(groups["inputs"], groups["add"], groups["insert"],
                                       self.outputs, self.reads)
        outs = [result[name] for name in self.outputs]
        self.values_read = {name: result[name].detach() for name in self.reads}
        if leaves:
            self._graph = (outs, leaves)
        return tuple(o.detach() for o in outs)

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        if self._graph is None:
            raise InvalidInputError("this boundary call was already differentiated once; run forward again")
        outs, leaves = self._graph
        self._graph = None
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        for name, g in zip(self.outputs, grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                raise InvalidInputError(f"the gradient sent back to {name} has NaN or infinite values")
        self.exposure.gradient_queries += 1
        if not pairs:
            return tuple(None for _ in leaves)
        return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)


class _Crossing(torch.autograd.Function):
    """The autograd node standing for the hidden backbone."""

    @staticmethod
    def forward(ctx, call: _Call, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.call = call
        ctx.set_materialize_grads(False)
        return call.forward(tensors)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, *ctx.call.vjp(grads))


class LocalHandle:
    """A backbone behind the boundary, in this process. Make one with ``open_backbone``.

    Example:
        >>> h = graytune.open_backbone("minilm", access="dark-gray")
        >>> shift = torch.zeros(1, 1, 384, requires_grad=True)
        >>> z = h.forward({"text": ["a cat"]}, add={"text.token_embeds": shift})["text.embeds"]
        >>> z.sum().backward()       # shift.grad is the VJP at the token embeddings
    """

    __slots__ = ("_backbone", "_full_spec", "access", "spec", "exposure", "_grants")

    def __init__(self, backbone: Backbone, access: AccessLevel, reads: Collection[str] = ()) -> None:
        self._backbone = backbone
        self._full_spec = backbone.spec
        self.access = access
        self.spec: BackboneSpec = backbone.spec.visible_at(access)
        self.exposure = Exposure(access=access)
        self._grants = frozenset(reads)
        for name in self._grants:
            port_for(self._full_spec, name, Op.READ, access, False, self._grants)

    def __repr__(self) -> str:
        return f"LocalHandle({self.spec.id!r}, access={self.access.label!r})"

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"text.input_ids", "text.attention_mask"}`` for ``texts`` (the owner's tokenizer)."""
        return self._backbone.tokenize(_texts(texts))

    def forward(
        self,
        inputs: Mapping[str, Tensor | Sequence[str]],
        *,
        add: Mapping[str, Tensor] | None = None,
        insert: Mapping[str, Tensor] | None = None,
        outputs: Sequence[str] | None = None,
        reads: Sequence[str] = (),
    ) -> dict[str, Tensor]:
        """Run the backbone; gradients flow back to any client tensor that requires them.

        Args:
            inputs: ``image.pixels`` ``[B, 3, H, W]``; ``text`` (a list of strings) or
                ``text.input_ids`` ``[B, L]`` (+ ``text.attention_mask``).
            add: per port, a delta broadcast onto its values (input ports from
                dark-gray, entry ports from light-gray).
            insert: per port, ``[B or 1, K, D]`` tokens (same levels as ``add``).
            outputs: output ports to return; default every output of the given modalities.
            reads: granted input/entry ports whose values to return too (detached).

        Returns:
            ``{port name: tensor}`` for each output (and read) port.
        """
        call = self._prepare(inputs, dict(add or {}), dict(insert or {}), outputs, list(reads))
        if self.access is AccessLevel.WHITE_BOX:  # plain autograd: weights of a rebound module train too
            result = self._backbone.run(call.inputs, call.add, call.insert, call.outputs, call.reads)
            return {name: result[name] for name in [*call.outputs, *call.reads]}
        diff = [self._lookup(call, group, port) for group, port in call.slots]
        if diff:
            values = _Crossing.apply(call, *diff)
        else:
            values = call.forward(())
        result = dict(zip(call.outputs, values))
        result.update(call.values_read)
        return result

    def encode_image(self, pixels: Tensor, **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` image embeddings (not normalised), the CLIP way."""
        return self.forward({"image.pixels": pixels}, outputs=["image.embeds"], **edits)["image.embeds"]

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor], **edits: Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` text embeddings (not normalised) for strings or tokenized ids."""
        inputs = dict(text) if isinstance(text, Mapping) else {"text": text}
        return self.forward(inputs, outputs=["text.embeds"], **edits)["text.embeds"]

    def module(self) -> nn.Module:
        """A copy of the backbone module (white-box only: baselines such as LoRA, full fine-tuning).

        Its parameters are frozen; call ``requires_grad_()`` on what you fine-tune.
        """
        if self.access < AccessLevel.WHITE_BOX:
            raise AccessDeniedError("the backbone module", AccessLevel.WHITE_BOX.label, self.access.label,
                                    "gray-box methods use forward() with add=/insert= instead")
        return copy.deepcopy(self._backbone.module())

    def with_module(self, module: nn.Module) -> LocalHandle:
        """A white-box handle running ``module``: a modified copy from ``module()`` (LoRA, full fine-tuning)."""
        if self.access < AccessLevel.WHITE_BOX:
            raise AccessDeniedError("running a modified backbone module", AccessLevel.WHITE_BOX.label,
                                    self.access.label)
        return LocalHandle(self._backbone.with_module(module), self.access, self._grants)

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _lookup(call: _Call, group: str, port: str) -> Tensor:
        return {"inputs": call.inputs, "add": call.add, "insert": call.insert}[group][port]

    def _prepare(self, raw_inputs: Mapping[str, Tensor | Sequence[str]], add: dict[str, Tensor],
                 insert: dict[str, Tensor], outputs: Sequence[str] | None, reads: list[str]) -> _Call:
        spec, level, exposure = self._full_spec, self.access, self.exposure
        inputs: dict[str, Tensor] = {}
        for name, value in raw_inputs.items():
            if name == "text" and "text" in spec.modalities:
                inputs.update(self.tokenize(value))  # type: ignore[arg-type]
                continue
            if name not in spec.port_names(PortKind.INPUT) or Op.REPLACE not in spec.port(name).ops:
                raise unknown_input(spec, name)
        for name, value in raw_inputs.items():
            if name != "text":
                grad = isinstance(value, Tensor) and value.requires_grad
                inputs[name] = check_tensor(port_for(spec, name, Op.REPLACE, level, grad), value, Op.REPLACE, None)
        for prefix in spec.modalities:
            if f"{prefix}.input_ids" in inputs:
                check_token_inputs(spec, inputs, prefix)
        batch = batch_size(inputs)
        slots = [("inputs", n) for n, t in inputs.items() if t.requires_grad]
        for op, group in ((Op.ADD, add), (Op.INSERT, insert)):
            for name, value in group.items():
                port = port_for(spec, name, op, level, True)
                check_tensor(port, value, op, batch)
                modality_in = any(k.startswith(port.modality + ".") for k in inputs)
                if not modality_in:
                    raise InvalidInputError(f"{op.value} at {name}: no {port.modality} input was sent")
                exposure.note(port, op)
                if value.requires_grad:
                    slots.append(("add" if op is Op.ADD else "insert", name))
        for name in reads:
            exposure.note(port_for(spec, name, Op.READ, level, False, self._grants), Op.READ)
        outputs = self._outputs(inputs, outputs)
        for name in [*inputs, *outputs]:
            exposure.note(spec.port(name), Op.READ if name in outputs else Op.REPLACE)
        exposure.forward_queries += 1
        exposure.forward_samples += batch
        return _Call(self._backbone, inputs, add, insert, outputs, reads, slots, exposure)

    def _outputs(self, inputs: Mapping[str, Tensor], asked: Sequence[str] | None) -> list[str]:
        modalities = {name.split(".")[0] for name in inputs}
        available = [p.name for p in self._full_spec.ports
                     if p.kind is PortKind.OUTPUT and (p.modality in modalities)]
        if asked is None:
            return available
        for name in asked:
            port_for(self._full_spec, name, Op.READ, self.access, False)
            if name not in available:
                raise InvalidInputError(f"output {name} needs {self._full_spec.port(name).modality} "
                                        f"inputs; this call sent {sorted(inputs)}")
        return list(asked)


def _texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError("text input must be a list of strings, e.g. ['a cat', 'a dog']")
    if not texts:
        raise InvalidInputError("text input is empty; send at least one string")
    return list(texts)
