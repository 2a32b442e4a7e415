"""The adapted model: adapters around a backbone handle, with CLIP's vocabulary.

Its ``parameters()`` are the adapters' (and, for white-box baselines, the
client's own copy of the module); the handle is not a module and adds none.

Example:
    >>> h = graytune.open_backbone("bridge:efficientnet-lite0+minilm", access="dark-gray")
    >>> model = AdaptedModel.build(h, "dga")
    >>> z = model.encode_text(["a red bicycle"])     # [1, 384], not normalised
    >>> logits = model.similarity(model.encode_image(pixels), z)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graytune.access import Handle
from graytune.adapters import ADAPTERS, Adapter, TowerRequest, build_adapter
from graytune.errors import InvalidInputError, UnknownNameError
from graytune.types import AccessLevel

Tensor = torch.Tensor


@dataclass(frozen=True)
class MethodPlan:
    """A method: which adapters go on which tower, and whether it changes the module (white-box)."""

    adapters: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()  # (adapter name, modality, options)
    whitebox: str = ""  # "", "lora" or "full"
    min_access: AccessLevel = AccessLevel.BLACK_BOX
    doc: str = ""


def _both(name: str, **options: Any) -> tuple[tuple[str, str, Mapping[str, Any]], ...]:
    return ((name, "image", options), (name, "text", options))


#: The methods ``graytune train --method`` knows; adapters on towers the backbone lacks are skipped.
METHODS: dict[str, MethodPlan] = {
    "zero-shot": MethodPlan(doc="the frozen backbone, no adapter"),
    "output": MethodPlan(_both("dga-output"), doc="DGA output adapters only (black-box)"),
    "output-mlp": MethodPlan(_both("output-mlp"), doc="CLIP-Adapter-style residual MLP on the outputs (black-box)"),
    "dga": MethodPlan((("dga-pixel", "image", {}), ("dga-text", "text", {}), *_both("dga-output")),
                      min_access=AccessLevel.DARK_GRAY, doc="DGA input and output adapters (dark-gray)"),
    "lga": MethodPlan((("dga-pixel", "image", {}), ("dga-text", "text", {}), *_both("lga"), *_both("dga-output")),
                      min_access=AccessLevel.LIGHT_GRAY, doc="DGA plus tokens at the declared entry layers"),
    "adalink": MethodPlan((("adalink", "text", {}), *_both("dga-output")), min_access=AccessLevel.DARK_GRAY,
                          doc="AdaLink on the token embeddings (needs a read grant) plus output adapters"),
    "lora": MethodPlan(whitebox="lora", min_access=AccessLevel.WHITE_BOX, doc="LoRA through PEFT (white-box)"),
    "full": MethodPlan(whitebox="full", min_access=AccessLevel.WHITE_BOX, doc="full fine-tuning (white-box)"),
}

# EfficientNet's convs are a custom "same"-padding class that PEFT cannot wrap (it rebuilds the
# class with other arguments), so on the image tower LoRA reaches its classifier layer only.
LORA_TARGETS = ("query", "value", "q_proj", "v_proj", "_fc")


@dataclass
class WhiteboxConfig:
    """Settings of the white-box baselines."""

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = field(default=LORA_TARGETS)


class AdaptedModel(nn.Module):
    """Adapters around a handle; ``encode_image``/``encode_text`` as in CLIP."""

    def __init__(self, handle: Handle, adapters: Sequence[Adapter] = (), module: nn.Module | None = None,
                 temperature: float = 0.07, method: str = "custom") -> None:
        super().__init__()
        for adapter in adapters:
            adapter.check_level(handle.access)
        self.handle = handle  # not an nn.Module: registers nothing
        self.method = method
        self.image_adapters = nn.ModuleList([a for a in adapters if a.modality == "image"])
        self.text_adapters = nn.ModuleList([a for a in adapters if a.modality == "text"])
        self.backbone_module = module  # white-box baselines only: the client's own copy
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    @classmethod
    def build(cls, handle: Handle, method: str, whitebox: WhiteboxConfig | None = None,
              **options: Mapping[str, Any]) -> AdaptedModel:
        """The model for a named method (see ``METHODS``); ``options[name]`` overrides an adapter's config."""
        if method not in METHODS:
            raise UnknownNameError("method", method, METHODS)
        plan = METHODS[method]
        if handle.access < plan.min_access:
            raise InvalidInputError(f"method {method!r} needs access level {plan.min_access.label}; the handle "
                                    f"was granted {handle.access.label}")
        unknown = set(options) - set(ADAPTERS.names())
        if unknown:
            raise UnknownNameError("adapter", sorted(unknown)[0], ADAPTERS.names())
        adapters = [build_adapter(name, handle.spec, modality, **{**opts, **options.get(name, {})})
                    for name, modality, opts in plan.adapters if modality in handle.spec.modalities]
        module = None
        if plan.whitebox:
            module = _whitebox_module(handle, plan.whitebox, whitebox or WhiteboxConfig())
            handle = handle.with_module(module)
        return cls(handle, adapters, module, method=method)

    # -- CLIP conventions ----------------------------------------------------------------

    def encode_image(self, pixels: Tensor) -> Tensor:
        """``[B, E]`` adapted image embeddings (not normalised) for ``[B, 3, H, W]`` pixels."""
        return self._tower("image", {"image.pixels": pixels}, self.image_adapters)

    def encode_video(self, frames: Tensor) -> Tensor:
        """``[B, E]`` video embeddings: the mean of the frames' image embeddings, for ``[B, F, 3, H, W]``."""
        if frames.dim() != 5:
            raise InvalidInputError(f"encode_video takes [B, F, 3, H, W] frames; got shape {list(frames.shape)}")
        per_frame = self.encode_image(frames.flatten(0, 1))  # [B*F, E]
        return per_frame.view(frames.shape[0], frames.shape[1], -1).mean(dim=1)

    def encode_text(self, text: Sequence[str] | Mapping[str, Tensor]) -> Tensor:
        """``[B, E]`` adapted text embeddings (not normalised) for strings or tokenized ids."""
        tokens = dict(text) if isinstance(text, Mapping) else self.handle.tokenize(text)
        return self._tower("text", tokens, self.text_adapters)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """The backbone's tokenizer (the owner's; it reveals no weights)."""
        return self.handle.tokenize(texts)

    def similarity(self, queries: Tensor, keys: Tensor) -> Tensor:
        """``[Q, K]`` cosine similarities scaled by the learnable temperature."""
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        return scale * F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T

    def _tower(self, modality: str, inputs: dict[str, Tensor], adapters: nn.ModuleList) -> Tensor:
        request = self.prepare_tower(modality, inputs)
        port = f"{modality}.embeds"
        embeds = self.handle.forward(request.inputs, add=request.add, insert=request.insert, outputs=[port])[port]
        return self.finish_tower(modality, embeds)

    def prepare_tower(self, modality: str, inputs: Mapping[str, Tensor]) -> TowerRequest:
        """The request this model's adapters make for one tower (before the boundary is crossed).

        A server batching several adapters through one backbone call uses this and ``finish_tower``.
        """
        adapters = self.image_adapters if modality == "image" else self.text_adapters
        request = TowerRequest(modality, dict(inputs))
        reads = sorted({port for a in adapters for port in a.reads})
        if reads:
            request.read = self.handle.forward(dict(inputs), outputs=[], reads=reads)
        for adapter in adapters:
            adapter.before(request)
        return request

    def finish_tower(self, modality: str, embeds: Tensor) -> Tensor:
        """``[B, E]`` tower embeddings mapped by this model's output adapters."""
        for adapter in self.image_adapters if modality == "image" else self.text_adapters:
            embeds = adapter.after(embeds)
        return embeds

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _whitebox_module(handle: Handle, kind: str, config: WhiteboxConfig) -> nn.Module:
    module = handle.module()  # a copy; the owner's stays untouched
    if kind == "full":
        return module.requires_grad_(True)
    from peft import LoraConfig, inject_adapter_in_model

    present = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    targets = [t for t in config.lora_targets if t in present]
    if not targets:
        raise InvalidInputError(f"lora: none of {list(config.lora_targets)} names a layer of {handle.spec.id}")
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=targets, lora_dropout=0.0)
    module = inject_adapter_in_model(lora, module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module
