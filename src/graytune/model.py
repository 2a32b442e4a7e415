"""The adapted model: adapters around a backbone handle, with CLIP's vocabulary.

Its ``parameters()`` are the adapters' (and, for white-box baselines, the
client's own copy of the module); the handle is not a module and adds none.

Example:
    >>> h = graytune.open_backbone("bridge:efficientnet-lite0+minilm", access="dark-gray")
    >>> model = AdaptedModel.build(h, "dga")
    >>> z = model.encode_text(["a red bicycle"])     # [1, 384], not normalised
    >>> logits = model.similarity(model.encode_image(pixels), z)
    >>> model(images=pixels, texts=["a red bicycle"]).logits_per_image     # [B, 1], as CLIP
    >>> model.save_pretrained("out/dga"); AdaptedModel.from_pretrained("out/dga", h)
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from graytune.access import Handle
from graytune.access.generation import Generated
from graytune.access.images import ImageSettings, generate_images
from graytune.adapters import (
    Adapter, TowerRequest, apply_whitebox, build_adapter, config_from_dict, whitebox_config, zo_parameters,
)
from graytune.adapters.lora import LoRAConfig, peft_config, trained_part
from graytune.artifact_files import WEIGHTS_NAME, check_fingerprint, read_config, read_weights, write_artifact
from graytune.errors import ArtifactError, InvalidInputError
from graytune.methods import METHODS, Method, MethodKind, artifact_method, backbone_kind, get_method
from graytune.types import GenerationSettings

Tensor = torch.Tensor


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
        self.whitebox: tuple[str, Any] | None = None  # white-box baselines: (adapter name, its config)
        self._artifact: dict[str, Any] | None = None  # config of the artifact loaded from or saved to
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))
        if backbone_kind(handle.spec) != "encoder":  # language and diffusion models compare no embeddings
            self.logit_scale.requires_grad_(False)
        self.to(getattr(handle, "device", torch.device("cpu")))  # in process: the backbone's device, no copies

    @property
    def config(self) -> Mapping[str, Any]:
        """The artifact's config, read-only, as transformers models expose theirs: ``method``, ``options``,
        ``backbone``, ``access``, and what training recorded (``image_size``, ``preprocess``, ``classes``,
        ``prompt``, ``task``, ``train``, ``metrics``, ...).

        A model not loaded from an artifact nor saved yet describes itself (method, options, access,
        backbone) and nothing of training. Each read is a fresh copy: changing it changes nothing.

        Example:
            >>> AdaptedModel.from_pretrained("out/dga", h).config["image_size"]   # 128: what it was trained at
        """
        return MappingProxyType(copy.deepcopy(self._artifact if self._artifact is not None else self._describe()))

    @property
    def device(self) -> torch.device:
        """Where the adapters live (float32); inputs are moved here and results come back here."""
        return self.logit_scale.device

    @classmethod
    def build(cls, handle: Handle, method: str, options: Mapping[str, Any] | None = None) -> AdaptedModel:
        """The model for a registered method (``graytune methods`` lists them).

        Args:
            handle: the backbone, opened at the method's level or above.
            method: a name from ``graytune.methods.METHODS``.
            options: as ``--option`` takes them: ``{"rank": 4}``, ``{"lga.layers": "2,4"}``; typed and
                checked against the method's adapters' config fields.

        Raises:
            AccessDeniedError: the handle's level is below the method's.
            InvalidInputError: an unknown option or a value of the wrong type (all reported at once).
        """
        spec = get_method(method)
        if spec.kind is MethodKind.LOGIT:
            raise InvalidInputError(f"method {method!r} is a logit adapter on class scores, not adapters around "
                                    f"a handle; it is made by {spec.trained_by}")
        spec.check_access(handle.access)
        spec.check_backbone(handle.spec)
        return cls._assemble(handle, spec, spec.resolve_options(options or {}))

    @classmethod
    def _assemble(cls, handle: Handle, method: Method, options: Mapping[str, Mapping[str, Any]]) -> AdaptedModel:
        """The model for ``method`` with ``options`` per adapter name (resolved, as artifacts store them)."""
        if method.kind is MethodKind.WHITEBOX:
            name = method.slots[0].adapter
            config = config_from_dict(method.adapter_class(method.slots[0]).config_class, options.get(name, {}), name)
            copy_ = handle.module()  # a copy; the owner's stays
            config = whitebox_config(name, copy_, config)
            module = apply_whitebox(name, copy_, config, handle.spec.id)
            model = cls(handle.with_module(module), (), module, method=method.name)
            model.whitebox = (name, config)
            return model
        adapters = [build_adapter(s.adapter, handle.spec, s.modality, **options.get(s.adapter, {}))
                    for s in method.slots_on(handle.spec)]
        return cls(handle, adapters, method=method.name)

    def adapter_options(self) -> dict[str, dict[str, Any]]:
        """Per adapter name, its resolved options: what an artifact records to rebuild this model."""
        options = {a.name: asdict(a.config) for a in [*self.image_adapters, *self.text_adapters]}
        if self.whitebox is not None:
            options[self.whitebox[0]] = asdict(self.whitebox[1])
        return options

    # -- PyTorch / transformers habits ---------------------------------------------------

    def forward(self, images: Tensor | None = None, texts: Sequence[str] | Mapping[str, Tensor] | None = None,
                ) -> CLIPOutput:
        """CLIP-style logits between ``images`` ``[I, 3, H, W]`` and ``texts`` (strings or token ids).

        Always returns a ``CLIPOutput``; with one modality only, its logits are None.
        """
        if images is None and texts is None:
            raise InvalidInputError("give images=[I, 3, H, W] pixels, texts=[...], or both")
        z_img = F.normalize(self.encode_image(images), dim=-1) if images is not None else None
        z_txt = F.normalize(self.encode_text(texts), dim=-1) if texts is not None else None
        per_image = per_text = None
        if z_img is not None and z_txt is not None:
            per_image = self.logit_scale.clamp(max=math.log(100.0)).exp() * z_img @ z_txt.T  # [I, T]
            per_text = per_image.T
        return CLIPOutput(per_image, per_text, z_img, z_txt)

    def save_pretrained(self, folder: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
        """Write this model's adapters as an artifact (see ``graytune.artifact_files``); returns the folder.

        ``extra`` (task, classes, preprocessing, metrics) goes into the config.
        """
        config: dict[str, Any] = {**self._describe(), **(extra or {})}
        if self.whitebox is not None and self.whitebox[0] == "lora":
            config = {**peft_fields(self.backbone_module, self.whitebox[1], self.handle.spec.id), **config}
        written = write_artifact(folder, config, self.adapter_state(peft_names=True))
        self._artifact = read_config(written)
        return written

    def _describe(self) -> dict[str, Any]:
        """What an artifact records of the model itself (``save_pretrained`` adds the training's ``extra``)."""
        spec = self.handle.spec
        entries = [{"name": a.name, "modality": a.modality, "ports": list(a.ports), "reads": list(a.reads)}
                   for a in [*self.image_adapters, *self.text_adapters]]
        return {
            "method": self.method, "kind": get_method(self.method).kind.value if self.method in METHODS else "custom",
            "options": self.adapter_options(), "access": self.handle.access.label,
            "reads": sorted(self.handle.grants), "backbone": spec.id, "fingerprint": spec.fingerprint,
            "adapters": entries, "trainable_parameters": self.trainable_parameters(),
            "exposure": self.handle.exposure.to_dict()}

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], handle: Handle) -> AdaptedModel:
        """The model saved in ``folder``, rebuilt around ``handle`` from the artifact alone.

        Raises:
            ArtifactError: missing or damaged files, a backbone whose fingerprint differs, or tensors
                that do not fit the recorded method.
            AccessDeniedError: the handle's level is below the artifact's method.
        """
        config = read_config(folder)
        check_fingerprint(config, handle.spec, folder)
        method = artifact_method(config)  # older names read as what they meant then
        if method.kind is MethodKind.LOGIT:
            raise ArtifactError(f"{folder} holds a {config['method']} logit adapter; load it with "
                                "graytune.transfer.load_transmiter (graytune eval does so itself)")
        method.check_access(handle.access)
        model = cls._assemble(handle, method, config.get("options") or {})
        state = read_weights(folder, config)
        expected = model.adapter_state(peft_names=True)
        if set(state) != set(expected):
            missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
            raise ArtifactError(f"{folder}/{WEIGHTS_NAME} does not fit method {config['method']!r} with options "
                                f"{config.get('options')}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        model.load_state_dict({_internal_name(k): v for k, v in state.items()}, strict=False)
        model._artifact = config
        return model

    def adapter_state(self, peft_names: bool = False) -> dict[str, Tensor]:
        """The tensors an artifact holds: adapters, temperature, and trainable white-box weights.

        With ``peft_names``, LoRA tensors carry PEFT's names (``base_model.model.<path>.lora_A.weight``).
        """
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        state = {k: v.detach() for k, v in self.state_dict().items()
                 if not k.startswith(_MODULE) or k in trainable}
        return {_peft_name(k) if peft_names else k: v for k, v in state.items()}

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
        here = self.device
        request = self.prepare_tower(modality, {k: v.to(here) if v.is_floating_point() else v
                                                for k, v in inputs.items()})
        port = f"{modality}.embeds"

        def embeds(insert: Mapping[str, Tensor]) -> Tensor:
            return self.handle.forward(request.inputs, add=request.add, insert=insert, outputs=[port])[port].to(here)

        plain = embeds(request.insert)
        if request.gate is not None:  # gated tokens: a second call with them, mixed by the gate
            plain = request.mix(plain, embeds(request.all_inserts()))
        return self.finish_tower(modality, plain)

    def prepare_tower(self, modality: str, inputs: Mapping[str, Tensor], generating: bool = False) -> TowerRequest:
        """The request this model's adapters make for one tower (before the boundary is crossed).

        A server batching several adapters through one backbone call uses this and ``finish_tower``.
        ``generating``: adapters with a ``token_map`` leave their edit to the owner (``maps``), which
        applies it to generated tokens too; the rest edit the request as in training.
        """
        adapters = [a for a in (self.image_adapters if modality == "image" else self.text_adapters)
                    if not (generating and a.token_map() is not None)]
        request = TowerRequest(modality, dict(inputs))
        reads = sorted({port for a in adapters for port in a.reads})
        if reads:
            request.read = self.handle.forward(dict(inputs), outputs=[], reads=reads)
        for adapter in adapters:
            adapter.before(request)
        return request

    # -- language models ---------------------------------------------------------------------

    def target_logprobs(self, tokens: Mapping[str, Tensor]) -> Tensor:
        """``[B, L]`` adapted log p(target_t | prefix) of a language model (0 where the target is -100).

        Args:
            tokens: ``text.input_ids``, ``text.attention_mask`` and ``text.target_ids`` ``[B, L]`` each.
        """
        here = self.device
        request = self.prepare_tower("text", {k: v.to(here) for k, v in tokens.items()})
        port = "text.target_logprobs"
        out = self.handle.forward(request.inputs, add=request.add, insert=request.insert, outputs=[port])
        return out[port].to(here)

    def generate(self, prompts: Sequence[str] | Mapping[str, Tensor],
                 settings: GenerationSettings | Mapping[str, Any] | None = None,
                 stream: Callable[[list[str]], None] | None = None) -> Generated:
        """What the adapted language model writes after each prompt (the owner decodes with a key-value cache).

        Shifts and inserted tokens act as in training; AdaLink's map reaches every generated token too.
        ``stream`` gets each row's text so far after every generated token.

        Example:
            >>> model.generate(["Definition: a domesticated feline\nWord:"], {"max_new_tokens": 4}).texts
        """
        tokens = dict(prompts) if isinstance(prompts, Mapping) else self.handle.tokenize(list(prompts))
        with torch.no_grad():
            request, maps = self.decoding_edits(tokens)
            return self.handle.generate(request.inputs, add=request.add, insert=request.insert, maps=maps,
                                        settings=settings, stream=stream)

    def decoding_edits(self, tokens: Mapping[str, Tensor]) -> tuple[TowerRequest, dict[str, dict[str, Tensor]]]:
        """What a generation from ``tokens`` sends the boundary: the prompt's edits (shifts, inserted tokens) and
        the token maps that reach every generated token too (AdaLink's), by port."""
        request = self.prepare_tower("text", {k: v.to(self.device) for k, v in tokens.items()}, generating=True)
        return request, dict(a.token_map() for a in self.text_adapters if a.token_map() is not None)

    # -- diffusion models --------------------------------------------------------------------

    def predict_noise(self, batch: Mapping[str, Tensor]) -> Tensor:
        """``[B, C, h, w]``: a diffusion model's UNet prediction (noise or v, as its spec says) for noisy latents at
        their timesteps, conditioned on the prompts as this model's text adapters edit them.

        Args:
            batch: ``text.input_ids`` and ``text.attention_mask`` ``[B, L]`` (``tokenize``), ``latents.noisy``
                ``[B, C, h, w]`` and ``timestep`` ``[B]`` int64; other keys are ignored.
        """
        here = self.device
        request = self.prepare_tower("text", {k: batch[k].to(here) for k in ("text.input_ids",
                                                                             "text.attention_mask")})
        inputs = {**request.inputs, "latents.noisy": batch["latents.noisy"].to(here), "timestep": batch["timestep"]}
        port = "unet.prediction"
        return self.handle.forward(inputs, add=request.add, insert=request.insert, outputs=[port])[port].to(here)

    def generate_images(self, prompts: Sequence[str] | Mapping[str, Tensor],
                        settings: ImageSettings | Mapping[str, Any] | None = None) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] a diffusion model draws for ``prompts``, the owner sampling, with this
        model's text edits on them (``graytune.access.images``).

        Example:
            >>> model.generate_images(["a picture of"], {"num_inference_steps": 25, "seed": 1})
        """
        return generate_images(self, prompts, settings)

    def finish_tower(self, modality: str, embeds: Tensor) -> Tensor:
        """``[B, E]`` tower embeddings mapped by this model's output adapters."""
        for adapter in self.image_adapters if modality == "image" else self.text_adapters:
            embeds = adapter.after(embeds)
        return embeds

    def trainable_parameters(self) -> int:
        """Numbers training changes: those with gradients and those of adapters trained zeroth-order (no gradients)."""
        zeroth = {id(p) for p in zo_parameters(self).values()}
        return sum(p.numel() for p in self.parameters() if p.requires_grad or id(p) in zeroth)


@dataclass
class CLIPOutput:
    """What calling an ``AdaptedModel`` returns, in CLIP's names.

    Attributes:
        logits_per_image: ``[I, T]`` scaled cosine similarities (None unless both modalities were given).
        logits_per_text: ``[T, I]``, its transpose.
        image_embeds: ``[I, E]`` normalised image embeddings, or None.
        text_embeds: ``[T, E]`` normalised text embeddings, or None.
    """

    logits_per_image: Tensor | None
    logits_per_text: Tensor | None
    image_embeds: Tensor | None
    text_embeds: Tensor | None


_MODULE = "backbone_module."
_PEFT = "base_model.model."


def _peft_name(key: str) -> str:
    """``backbone_module.<path>.lora_A.default.weight`` → PEFT's ``base_model.model.<path>.lora_A.weight``."""
    if key.startswith(_MODULE) and (".lora_A.default." in key or ".lora_B.default." in key):
        return _PEFT + key[len(_MODULE):].replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.",
                                                                                            ".lora_B.")
    return key


def _internal_name(key: str) -> str:
    if key.startswith(_PEFT):
        return _MODULE + key[len(_PEFT):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.",
                                                                                          ".lora_B.default.")
    return key


def peft_fields(module: nn.Module | None, config: LoRAConfig, backbone: str) -> dict[str, Any]:
    """PEFT's ``LoraConfig`` fields for a LoRA artifact, so ``PeftModel.from_pretrained`` reads it, and
    ``AutoPeftModelForFeatureExtraction.from_pretrained`` (its task: the encoder's hidden states, no head)."""
    assert module is not None  # a LoRA model always holds its module
    base = getattr(getattr(module, "config", None), "_name_or_path", "") or backbone
    fields = peft_config(trained_part(module), config, backbone).to_dict()
    fields.update(base_model_name_or_path=base, inference_mode=True, task_type="FEATURE_EXTRACTION")
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in fields.items()}
