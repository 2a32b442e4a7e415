"""The in-process boundary: a handle that exposes a backbone only at its granted level.

The handle is not an ``nn.Module``: putting it inside a client model adds no
parameters, and nothing it offers below white-box returns a weight. Gradients
cross it as one autograd node whose backward is the vector–Jacobian product at
the client's tensors, so adapters train with any optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from graytune.access.checks import CallPlan, plan_call, port_for, texts_of
from graytune.access.handle import cross
from graytune.backbones.base import Backbone
from graytune.errors import AccessDeniedError, InvalidInputError
from graytune.types import AccessLevel, BackboneSpec, Exposure, Op, required_level

Tensor = torch.Tensor


class BoundaryCall:
    """One forward through the boundary, kept until its backward (owner side).

    The in-process handle drives it through an autograd node; the server drives it
    directly (forward now, ``vjp`` on a later request) and keeps it in its session store.
    """

    def __init__(self, backbone: Backbone, plan: CallPlan, exposure: Exposure, measure: bool = False) -> None:
        self.backbone, self.plan, self.exposure, self.measure = backbone, plan, exposure, measure
        self.values_read: dict[str, Tensor] = {}
        self.nbytes = 0  # what this call holds until its backward (counted when ``measure``)
        self.output_shapes: dict[str, list[int]] = {}
        self._graph: tuple[list[Tensor], list[Tensor]] | None = None

    @property
    def differentiable(self) -> bool:
        return bool(self.plan.slots)

    def forward(self, tensors: Sequence[Tensor]) -> tuple[Tensor, ...]:
        plan = self.plan
        groups = {"inputs": dict(plan.inputs), "add": dict(plan.add), "insert": dict(plan.insert)}
        leaves = []
        for (group, port), tensor in zip(plan.slots, tensors):
            leaf = tensor.detach().requires_grad_(True)
            groups[group][port] = leaf
            leaves.append(leaf)
        with torch.set_grad_enabled(bool(leaves)):
            result = self.backbone.run(groups["inputs"], groups["add"], groups["insert"], plan.outputs, plan.reads)
        outs = [result[name] for name in plan.outputs]
        self.output_shapes = {name: list(o.shape) for name, o in zip(plan.outputs, outs)}
        self.values_read = {name: result[name].detach() for name in plan.reads}
        if leaves:
            self._graph = (outs, leaves)
            if self.measure:
                self.nbytes = _graph_bytes(self, outs)
        return tuple(o.detach() for o in outs)

    def vjp(self, grads: Sequence[Tensor | None]) -> tuple[Tensor | None, ...]:
        if self._graph is None:
            raise InvalidInputError("this boundary call was already differentiated once; run forward again")
        outs, leaves = self._graph
        self._graph = None
        self.nbytes = 0
        for name, g in zip(self.plan.outputs, grads):
            if g is not None and not bool(torch.isfinite(g).all()):
                raise InvalidInputError(f"the gradient sent back to {name} has NaN or infinite values")
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        self.exposure.gradient_queries += 1
        if not pairs:
            return tuple(None for _ in leaves)
        return torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)


_WEIGHTS: dict[int, frozenset[int]] = {}


def _weight_storages(backbone: Backbone) -> frozenset[int]:
    key = id(backbone.module())
    if key not in _WEIGHTS:
        module = backbone.module()
        _WEIGHTS[key] = frozenset(t.untyped_storage().data_ptr()
                                  for t in [*module.parameters(), *module.buffers()])
    return _WEIGHTS[key]


def _graph_bytes(call: BoundaryCall, outs: Sequence[Tensor]) -> int:
    """The bytes of the tensors ``outs``' graph saved for the backward (each storage once).

    Walks the graph's nodes rather than installing saved-tensor hooks: a pack hook
    that returns the tensor makes a cycle through C++ for every saved output, and
    those graphs would never be freed.
    """
    seen = set(_weight_storages(call.backbone))  # the owner's weights are shared, not the session's
    total, visited = 0, set()
    stack = [o.grad_fn for o in outs]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for name in dir(node):
            if not name.startswith("_saved_"):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:  # already freed, or not a tensor
                continue
            for t in value if isinstance(value, tuple | list) else (value,):
                if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in seen:
                    seen.add(t.untyped_storage().data_ptr())
                    total += t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return total


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
    def grants(self) -> frozenset[str]:
        """Input or entry ports this handle may read."""
        return self._grants

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``{"text.input_ids", "text.attention_mask"}`` for ``texts`` (the owner's tokenizer)."""
        return self._backbone.tokenize(texts_of(texts))

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
        plan = self.plan(inputs, add or {}, insert or {}, outputs, reads)
        if self.access is AccessLevel.WHITE_BOX:  # plain autograd: weights of a rebound module train too
            result = self._backbone.run(plan.inputs, plan.add, plan.insert, plan.outputs, plan.reads)
            return {name: result[name] for name in [*plan.outputs, *plan.reads]}
        return cross(BoundaryCall(self._backbone, plan, self.exposure))

    def plan(self, inputs: Mapping[str, Tensor | Sequence[str]], add: Mapping[str, Tensor],
             insert: Mapping[str, Tensor], outputs: Sequence[str] | None, reads: Sequence[str]) -> CallPlan:
        """Check a request at this handle's level and note it in ``exposure`` (see ``forward``)."""
        return plan_call(self._full_spec, self.access, self._grants, self.exposure, self.tokenize,
                         inputs, add, insert, outputs, reads)

    def open_call(self, plan: CallPlan, measure: bool = False) -> BoundaryCall:
        """A call the owner drives by hand (the server): ``forward`` now, ``vjp`` later."""
        return BoundaryCall(self._backbone, plan, self.exposure, measure)

    def at_level(self, access: AccessLevel) -> LocalHandle:
        """The same backbone at a level no higher than this handle's (the grants that level may hold)."""
        if access > self.access:
            raise AccessDeniedError(f"a handle at {access.label}", access.label, self.access.label)
        grants = [n for n in self._grants if required_level(self._full_spec.port(n).kind, Op.READ, False) <= access]
        return LocalHandle(self._backbone, access, grants)

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
