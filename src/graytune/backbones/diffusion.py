"""Text-to-image diffusion models behind the ports: the backbone that ``hf-diffusion:<dir or hub id>`` (a diffusers
Stable Diffusion 1.x/2.x folder, ``hf_diffusion``) and ``arch:sd-tiny`` (random weights, ``diffusion_tiny``) build.
Not a provider: nothing here registers a backbone id.

The owner keeps the text encoder, the UNet and the VAE. A client sends its prompts (and its edits to them), its own
noisy latents and their timesteps, and gets the UNet's prediction back; its images' latents come from an owner-side
VAE encode, so it never holds the VAE either.
The owner also samples images for a client (``sample``: the pipeline's loop in ``diffusion_sampling``, the
client's edits on the prompts); only the decoded images come back.

Ports:

- ``text.input_ids`` / ``text.attention_mask`` ``[B, L]`` (replace): ``tokenize`` pads every text to ``max_tokens``
  (77 for SD), as diffusers' pipeline does. The text encoder attends causally over all L positions and applies the
  padding mask only where its config sets ``use_attention_mask`` (as the pipeline); the UNet cross-attends to every
  position, padding included.
- ``text.token_embeds`` ``[B, L, D]`` (add, insert before each row's end token, read by grant), ``text.layer.k``
  (k = 1..n-1) and ``text.prompts.k`` (light-gray): as a CLIP text tower's (``dual_encoder.run_text_layers``). Adds
  stay off padding; tokens inserted at ``text.token_embeds`` take the places of trailing padding (the boundary cuts
  it, ``spec.preprocess["text"]["long_texts"]``); tokens inserted inside lengthen what the UNet attends to.
- ``latents.noisy`` ``[B, C, h, w]`` and ``timestep`` ``[B]`` int64 in ``[0, num_train_timesteps)`` (replace).
- ``unet.prediction`` ``[B, C, h, w]``: the UNet's output for those latents and timesteps, conditioned on the
  (edited) prompts' last hidden states: the noise (``epsilon``) or ``v`` as the scheduler's ``prediction_type``
  says (``spec.preprocess["latents"]``, which also publishes the scheduler's config: no weights).
- ``image.pixels`` ``[B, 3, H, W]`` in [-1, 1], H and W multiples of the VAE's factor f (replace), and
  ``image.latents`` ``[B, C, H/f, W/f]``: the mean of the VAE's posterior times its scaling factor. Forward only:
  a gradient asked at the pixels is refused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from graytune.backbones import diffusion_sampling
from graytune.backbones.base import OneModule, freeze, run_layer
from graytune.backbones.dual_encoder import require_tokenizer, run_text_layers
from graytune.backbones.ports import text_ports
from graytune.backbones.tokens import PortEdits
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
PREDICTION, NOISY, TIMESTEP = "unet.prediction", "latents.noisy", "timestep"
PIXELS, LATENTS = "image.pixels", "image.latents"
TOKEN_EMBEDS = "text.token_embeds"


class DiffusionModules(nn.Module):
    """What the owner keeps of a Stable Diffusion pipeline, as one module (it moves and casts as one).

    Attributes:
        text_encoder: a transformers ``CLIPTextModel``.
        unet: a diffusers ``UNet2DConditionModel``.
        vae: a diffusers ``AutoencoderKL``.
    """

    def __init__(self, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module) -> None:
        super().__init__()
        self.text_encoder, self.unet, self.vae = text_encoder, unet, vae


class HFDiffusion(OneModule):
    """A Stable Diffusion text encoder, UNet and VAE behind the graytune ports (see the module docstring).

    Args:
        modules: the frozen text encoder, UNet and VAE.
        tokenizer: the text encoder's CLIP tokenizer.
        scheduler: the pipeline's diffusers scheduler (its config is published; the owner keeps the object for
            sampling).
        backbone_id: the id the spec carries, e.g. ``hf-diffusion:/models/sd15``.
        identity: what the fingerprint hashes besides the spec (the weight files' identity, never a path).
        about: the spec's description.
    """

    def __init__(self, modules: DiffusionModules, tokenizer: Any, scheduler: Any, backbone_id: str, identity: str,
                 about: str) -> None:
        self.model, self.tokenizer, self.scheduler = freeze(modules), tokenizer, scheduler
        recompute_unet_blocks(self.model.unet)
        text_cfg, vae_cfg = self.model.text_encoder.config, self.model.vae.config
        stated = getattr(tokenizer, "model_max_length", None) or text_cfg.max_position_embeddings
        self.max_tokens = int(min(stated, text_cfg.max_position_embeddings))
        self.train_timesteps = int(scheduler.config.num_train_timesteps)
        self.vae_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        channels = int(self.model.unet.config.in_channels)
        self.spec = BackboneSpec(
            id=backbone_id, modalities=("text", "latents", "image"),
            ports=tuple(diffusion_ports(text_cfg, self.max_tokens, channels, self.vae_factor)),
            preprocess={"text": self._text_preprocess(), "latents": self._latents_preprocess(),
                        "image": self._image_preprocess()},
            description=about,
        ).with_fingerprint(identity)

    def _text_preprocess(self) -> dict[str, Any]:
        cfg = self.model.text_encoder.config
        return {"tokenizer": type(self.tokenizer).__name__ if self.tokenizer is not None else "none (send ids)",
                "max_tokens": self.max_tokens, "vocab_size": int(cfg.vocab_size),
                "padding": f"every text padded to max_tokens ({self.max_tokens}), as diffusers' pipeline tokenizes",
                "attention_mask_used": bool(getattr(cfg, "use_attention_mask", False)),
                "insert_position": "before the end token",
                "long_texts": "texts are cut to max_tokens; tokens inserted at text.token_embeds take the places of "
                              "trailing padding (a text with too little padding loses the tokens before its end "
                              "token)"}

    def _latents_preprocess(self) -> dict[str, Any]:
        cfg = self.scheduler.config
        return {"channels": int(self.model.unet.config.in_channels),
                "sample_size": _plain(self.model.unet.config.sample_size),
                "num_train_timesteps": self.train_timesteps,
                "prediction_type": str(cfg.get("prediction_type", "epsilon")),
                "scheduler": {"class": type(self.scheduler).__name__,
                              "config": {k: _plain(v) for k, v in cfg.items() if not k.startswith("_")}},
                "target": "epsilon: the noise added; v_prediction: alpha_t * noise - sigma_t * latents "
                          "(the scheduler's get_velocity)"}

    def _image_preprocess(self) -> dict[str, Any]:
        sample = self.model.unet.config.sample_size
        return {"range": "RGB in [-1, 1]: 2 * x - 1 for pixels x in [0, 1] (diffusers' VaeImageProcessor)",
                "multiple_of": self.vae_factor, "vae_scale_factor": self.vae_factor,
                "image_size": int(sample) * self.vae_factor if isinstance(sample, int) else None,
                "scaling_factor": float(self.model.vae.config.scaling_factor),
                "latents": "image.latents: the mean of the VAE posterior times scaling_factor"}

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """``text.input_ids`` and ``text.attention_mask`` ``[B, max_tokens]``: padded to ``max_tokens`` and cut there,
        as ``StableDiffusionPipeline.encode_prompt`` tokenizes."""
        tokenizer = require_tokenizer(self.tokenizer, self.spec.id)
        batch = tokenizer(list(texts), padding="max_length", max_length=self.max_tokens, truncation=True,
                          return_tensors="pt")
        return {"text.input_ids": batch["input_ids"], "text.attention_mask": batch["attention_mask"]}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        self.check_request(inputs, outputs)
        out: dict[str, Tensor] = {}
        if LATENTS in outputs:
            out[LATENTS] = self.encode_images(inputs[PIXELS])
        text_reads = [name for name in reads if name.startswith("text.")]
        if PREDICTION not in outputs and set(text_reads) <= {TOKEN_EMBEDS}:  # no text forward needed
            if text_reads:
                out[TOKEN_EMBEDS] = self.model.text_encoder.embeddings.token_embedding(inputs["text.input_ids"])
            return out
        hidden = self.encode_prompts(inputs, PortEdits(add, insert, reads, out))
        if PREDICTION in outputs:
            out[PREDICTION] = self.predict(inputs[NOISY], inputs[TIMESTEP], hidden)
        return out

    def check_request(self, inputs: Mapping[str, Tensor], outputs: Sequence[str]) -> None:
        """What the boundary's port checks cannot see, checked before any work: a prediction's timesteps and
        prompts, the images' size, and that no gradient is asked through the VAE.

        Raises:
            InvalidInputError: what was received, what is allowed, and what to send instead.
        """
        if PREDICTION in outputs:
            missing = [(name, fix) for name, fix in (
                (TIMESTEP, f"{TIMESTEP}: [B] int64, one per row"),
                ("text", "text: the prompts, or text.input_ids (the empty prompt '' gives the unconditional "
                         "prediction)")) if name not in inputs and f"{name}.input_ids" not in inputs]
            if missing:
                raise InvalidInputError(
                    f"{PREDICTION} needs {NOISY}, their timesteps and the prompts in one call; this call sent no "
                    f"{' and no '.join(name for name, _ in missing)}; send {'; and '.join(fix for _, fix in missing)}")
            self.check_timesteps(inputs[TIMESTEP])
        if LATENTS in outputs:
            self.check_pixels(inputs[PIXELS])

    def check_timesteps(self, timestep: Tensor) -> None:
        """Timesteps ``[B]`` must lie in ``[0, num_train_timesteps)``."""
        low, high = int(timestep.min()), int(timestep.max())
        if low < 0 or high >= self.train_timesteps:
            raise InvalidInputError(
                f"{TIMESTEP}: got values {low}..{high}; this model's scheduler ({type(self.scheduler).__name__}) "
                f"was trained on timesteps 0..{self.train_timesteps - 1}: send one whole number in "
                f"[0, {self.train_timesteps}) per row")

    def check_pixels(self, pixels: Tensor) -> None:
        """Pixels ``[B, 3, H, W]``: H and W multiples of the VAE's factor, and no gradient asked (forward only)."""
        height, width, f = int(pixels.shape[-2]), int(pixels.shape[-1]), self.vae_factor
        if height % f or width % f or min(height, width) < f:
            raise InvalidInputError(
                f"{PIXELS}: got {height}x{width} pixels; the VAE downsamples by {f}, so height and width must be "
                f"positive multiples of {f} (e.g. {max(f, height - height % f)}x{max(f, width - width % f)}): "
                "resize or crop the images first")
        if pixels.requires_grad:
            raise InvalidInputError(
                f"{LATENTS} is forward only: the VAE encode returns no gradient; send {PIXELS} that do not require "
                "gradients (e.g. under torch.no_grad()), and train on the latents it returns")

    def encode_images(self, pixels: Tensor) -> Tensor:
        """``[B, C, H/f, W/f]``: the mean of the VAE posterior of ``pixels`` ``[B, 3, H, W]`` times its scaling
        factor (no graph is kept)."""
        vae = self.model.vae
        with torch.no_grad():
            mean = vae.encode(pixels).latent_dist.mean  # [B, C, H/f, W/f]
        return mean * float(vae.config.scaling_factor)

    def encode_prompts(self, inputs: Mapping[str, Tensor], edits: PortEdits) -> Tensor:
        """``[B, L', D]``: the text encoder's final-layernormed hidden states of every position (what the UNet
        cross-attends to), ``edits`` applied at ``text.token_embeds`` and each ``text.layer.k``."""
        text = self.model.text_encoder
        eos = text.config.eos_token_id
        ends = end_positions(inputs["text.input_ids"], 2 if eos is None else int(eos))  # [B]: inserts go before
        hidden, _ = run_text_layers(text, inputs, edits, ends, attention=self._attention, max_tokens=self.max_tokens,
                                    model="text encoder", is_causal=True)
        return hidden

    def _attention(self, inputs_embeds: Tensor, attention_mask: Tensor) -> Any:
        """The causal mask the text encoder's layers take; padding is masked only where its config says so."""
        from transformers.masking_utils import create_causal_mask

        cfg = self.model.text_encoder.config
        used = attention_mask if getattr(cfg, "use_attention_mask", False) else None
        return create_causal_mask(config=cfg, inputs_embeds=inputs_embeds, attention_mask=used, cache=None)

    def sample(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
               negative: Mapping[str, Tensor], **settings: Any) -> Tensor:
        """``[B, 3, H, W]`` images in [0, 1] from the prompts, the owner sampling (``diffusion_sampling.sample``)."""
        return diffusion_sampling.sample(self, inputs, add, insert, negative, **settings)

    def predict(self, noisy: Tensor, timestep: Tensor, hidden: Tensor) -> Tensor:
        """``[B, C, h, w]``: the UNet's output for ``noisy`` latents at ``timestep`` ``[B]``, cross-attending to
        ``hidden`` ``[B, L', D]``."""
        return self.model.unet(noisy, timestep, encoder_hidden_states=hidden, return_dict=False)[0]


def describe(modules: DiffusionModules, scheduler: Any, what: str) -> str:
    """The spec's description: ``what`` (where the pipeline came from), then its parts' sizes."""
    text, unet, vae = modules.text_encoder.config, modules.unet, modules.vae.config
    f = 2 ** (len(vae.block_out_channels) - 1)
    millions = sum(p.numel() for p in unet.parameters()) / 1e6
    return (f"{what}: a {text.num_hidden_layers}-layer {text.hidden_size}-d CLIP text encoder, a UNet2DConditionModel "
            f"of {millions:.3g} M parameters, an AutoencoderKL (latents {vae.latent_channels} x H/{f} x W/{f}) and a "
            f"{type(scheduler).__name__} ({scheduler.config.get('prediction_type', 'epsilon')} prediction, "
            f"{scheduler.config.num_train_timesteps} training timesteps); the owner keeps all three models.")


def diffusion_ports(text_cfg: Any, max_tokens: int, channels: int, vae_factor: int) -> list[PortSpec]:
    """The ports of a Stable Diffusion backbone, in the order its fingerprint hashes them (module docstring)."""
    dim, f = int(text_cfg.hidden_size), vae_factor
    text = [replace(p, doc="token embeddings (the lookup rows); inserted tokens go before the end token; the "
                           "lookup stays on the owner's side") if p.name == TOKEN_EMBEDS else p
            for p in text_ports("text", dim, range(1, int(text_cfg.num_hidden_layers)), max_tokens)]
    return [
        *text,
        PortSpec(NOISY, PortKind.INPUT, ("B", channels, "h", "w"), "float32", (Op.REPLACE,), "latents",
                 "the client's noisy latents (image.latents with the scheduler's noise added at timestep)"),
        PortSpec(TIMESTEP, PortKind.INPUT, ("B",), "int64", (Op.REPLACE,), "latents",
                 "each row's diffusion timestep, in [0, num_train_timesteps) (spec.preprocess['latents'])"),
        PortSpec(PIXELS, PortKind.INPUT, ("B", 3, "H", "W"), "float32", (Op.REPLACE,), "image",
                 f"RGB pixels in [-1, 1], H and W multiples of {f}"),
        PortSpec(PREDICTION, PortKind.OUTPUT, ("B", channels, "h", "w"), "float32", (Op.READ,), "latents",
                 "the UNet's prediction (noise or v: spec.preprocess['latents']['prediction_type']) for the noisy "
                 "latents and timesteps, conditioned on the (edited) prompts"),
        PortSpec(LATENTS, PortKind.OUTPUT, ("B", channels, f"H/{f}", f"W/{f}"), "float32", (Op.READ,), "image",
                 "the VAE posterior's mean times its scaling factor; forward only (no gradient at the pixels)"),
    ]


def end_positions(ids: Tensor, eos_token_id: int) -> Tensor:
    """``[B]``: each row's end token, as ``CLIPTextModel`` finds it (configs with the legacy ``eos_token_id`` 2: the
    highest id; others: the first ``eos_token_id``)."""
    if eos_token_id == 2:
        return ids.to(torch.int).argmax(dim=-1).long()
    return (ids == eos_token_id).int().argmax(dim=-1).long()


def recompute_unet_blocks(unet: nn.Module) -> None:
    """Route the UNet's resnet and transformer blocks through ``run_layer`` (diffusers' gradient-checkpointing hook),
    so owner-side recomputation (``open_backbone(..., recompute=True)``) checkpoints them; without it they run as
    usual, and the module stays as shared as before (nothing per call is stored on it)."""
    unet.enable_gradient_checkpointing(gradient_checkpointing_func=_through_run_layer)


def _through_run_layer(module: nn.Module, *args: Any) -> Any:
    return run_layer(module, *args)


def _plain(value: Any) -> Any:
    """``value`` as plain JSON data (a scheduler's or UNet's config value: lists, numbers, strings, None)."""
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))
