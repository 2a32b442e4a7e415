"""What every backbone provider offers the boundary: the ``Backbone`` protocol, and where it runs.

A provider file (``minilm.py``, ``efficientnet.py``, ...) is the only code that
knows a model's internals. It builds an object with the ``Backbone`` protocol;
the boundary in ``graytune.access`` is the only caller of ``run``. Besides the
protocol this file holds what decides where and how a backbone's module runs:
freezing it, its device and dtype (``place``), and recomputing its layers in the
backward (``recomputing``, ``run_layer``).

The helpers providers share live beside it, one job a file: ``loading`` (weights
and checkpoints), ``ports`` (port lists), ``tokens`` (edits to token sequences).
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from graytune.types import BackboneSpec

Tensor = torch.Tensor


@runtime_checkable
class Backbone(Protocol):
    """A frozen model and the spec it publishes. Owner side only."""

    spec: BackboneSpec

    def run(
        self,
        inputs: Mapping[str, Tensor],
        add: Mapping[str, Tensor],
        insert: Mapping[str, Tensor],
        outputs: Collection[str],
        reads: Collection[str],
    ) -> dict[str, Tensor]:
        """Compute ``outputs`` (and the values at ``reads``) as plain differentiable torch.

        Args:
            inputs: values at input ports with op ``replace``, e.g. ``image.pixels``.
            add: per port, a delta broadcast onto the port's values.
            insert: per port, ``[B or 1, K, D]`` tokens placed where pooling sees them.
            outputs: output port names to return.
            reads: input/entry port names whose values to return (granted reads only).
        """
        ...

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``text.input_ids`` and ``text.attention_mask`` for ``texts`` ([B, L] int64)."""
        ...

    def module(self) -> nn.Module:
        """The frozen module itself (white-box baselines only)."""
        ...

    def with_module(self, module: nn.Module) -> Backbone:
        """This backbone running ``module`` (a client's modified copy of ``module()``), same spec."""
        ...


@runtime_checkable
class LanguageModel(Backbone, Protocol):
    """A backbone that also decodes (causal language models): what ``handle.generate`` calls, owner side."""

    def generate(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                 maps: Mapping[str, Mapping[str, Tensor]], settings: Any,
                 on_token: Callable[[Tensor], None] | None = None) -> tuple[Tensor, Tensor]:
        """``([B, N] new token ids, padded after each row's end; [B] tokens per row)`` after each prompt.

        ``on_token`` is called with the ``[B]`` tokens of each step as they are chosen (for streaming).

        ``add`` of shape ``[B or 1, 1, D]`` reaches every generated token too; inserts are a prefix placed once;
        ``maps`` (``{"down": [r, D], "up": [D, r]}`` at ``text.token_embeds``) turn every token's embedding x
        into ``x + up(down(x))``; ``settings`` is a ``GenerationSettings``. Decodes with a key–value cache.
        """
        ...

    def detokenize(self, ids: Tensor, lengths: Tensor) -> list[str]:
        """Each row's first ``lengths[b]`` ids as text (the tokenizer's decode)."""
        ...


_recompute = threading.local()  # on this thread: the inputs checkpointed layers keep, or None when not recomputing


@contextlib.contextmanager
def recomputing(on: bool) -> Iterator[list[Tensor]]:
    """Inside the block, ``run_layer`` keeps only each layer's inputs and recomputes the layer in the backward.

    The weights are frozen, so the recomputed activations equal the first ones exactly: this trades one
    more forward for the activation memory of every layer but one. Yields the list of tensors the
    checkpointed layers keep (each layer's inputs), so their memory can be counted.
    """
    previous = getattr(_recompute, "kept", None)
    kept: list[Tensor] = []
    _recompute.kept = kept if on else None
    try:
        yield kept
    finally:
        _recompute.kept = previous


def run_layer(layer: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``layer(*args, **kwargs)``, checkpointed when recomputation is on and a gradient is wanted.

    Every provider calls its repeated blocks (transformer layers, MBConv blocks) through this, so
    owner-side recomputation (``open_backbone(..., recompute=True)``, ``graytune serve --recompute``)
    works on every backbone.
    """
    kept = getattr(_recompute, "kept", None)
    if kept is not None and torch.is_grad_enabled():
        kept.extend(a for a in [*args, *kwargs.values()] if isinstance(a, Tensor))
        return checkpoint(layer, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return layer(*args, **kwargs)


@runtime_checkable
class ImageGenerator(Backbone, Protocol):
    """A backbone that also samples images (text-to-image diffusion models): what ``handle.generate_images``
    calls, owner side."""

    def sample(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
               negative: Mapping[str, Tensor], *, steps: int, guidance: float, seed: int, height: int,
               width: int) -> Tensor:
        """``[B, 3, height, width]`` float32 images in [0, 1], one per prompt row of ``inputs``, ``add`` and
        ``insert`` applied to the prompts' encoding, ``negative`` ``[B, L]`` ids (and mask) the plain negative
        prompts of classifier-free guidance (scale ``guidance``; at most 1: none), ``steps`` scheduler steps from
        latents seeded by ``seed`` (``graytune.backbones.diffusion_sampling``)."""
        ...


class OneModule:
    """``module()``/``with_module()`` for a provider whose whole backbone is one module in ``self.model``."""

    model: nn.Module

    def module(self) -> nn.Module:
        return self.model

    def with_module(self, module: nn.Module) -> Any:
        """This provider running ``module`` (a client's modified copy of ``module()``), same spec."""
        other = copy.copy(self)
        other.model = module
        return other


def module_placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``module``'s first floating parameter or buffer (CPU/fp32 if none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def place(backbone: Backbone, device: torch.device, dtype: torch.dtype) -> Backbone:
    """``backbone`` with its module on ``device`` in ``dtype`` (a copy; the shared, cached module is untouched).

    Half precision casts the frozen weights (memory halves, the matmuls run in half); the boundary
    casts the client's tensors in and the results back to float32.
    """
    module = backbone.module()
    if module_placement(module) == (device, dtype):
        return backbone
    moved = copy.deepcopy(module).to(device=device, dtype=dtype)
    return backbone.with_module(freeze(moved))


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with no parameter requiring gradients."""
    module.eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module
