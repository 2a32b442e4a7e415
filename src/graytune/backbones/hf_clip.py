"""Any Hugging Face ``CLIPModel`` checkpoint: ``hf-clip:<local dir or hub id>``.

Ports: ``image.pixels`` [B, 3, S, S], ``image.patch_embeds`` [B, N, D] (the patch
embeddings before [CLS] and the position embeddings join them: add, read when
granted), ``image.layer.k`` (entries into vision layer k; insert places tokens
after [CLS]), ``image.embeds`` [B, E];
``text.input_ids``/``text.attention_mask``, ``text.token_embeds`` (add, insert
before the end token, where pooling sees them), ``text.layer.k``,
``text.embeds`` [B, E]. Embeddings are projected, not normalised. Each tower's
``<m>.prompts.k`` take prompt tokens, placed where inserts at ``<m>.layer.k`` go;
each later prompts port writes over them (``tokens.PromptSlots``).

Nothing here downloads on its own: a hub id loads only where the hub is
reachable and allowed; tests use a tiny random CLIP they save locally.
What CLIP shares with SigLIP (loading, the common ports, the tower loops) is in
``dual_encoder``; this file keeps what is CLIP's own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial

import torch
from torch import nn

from graytune.backbones.base import OneModule, freeze
from graytune.backbones.dual_encoder import (
    dual_encoder_ports,
    dual_encoder_spec,
    image_preprocessing,
    load_dual_encoder,
    require_tokenizer,
    run_text_layers,
    run_towers,
    run_vision_layers,
    text_preprocessing,
)
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PortEdits
from graytune.types import Op, PortKind, PortSpec

Tensor = torch.Tensor
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
PATCH_PORT = "image.patch_embeds"


class HFClip(OneModule):
    """A transformers ``CLIPModel`` behind the graytune ports.

    Args:
        model: the frozen ``CLIPModel``.
        tokenizer: its tokenizer, or ``None`` (then clients send ``text.input_ids``).
        backbone_id: the id the spec carries, e.g. ``hf-clip:/models/clip``.
        identity: what the fingerprint hashes besides the spec (the weight files' identity).
        image_stats: the image mean and std clients normalise with.
        description: the spec's description.
        stats_source: where ``image_stats`` came from (the spec says it to clients).
    """

    def __init__(self, model: nn.Module, tokenizer: object | None, backbone_id: str, identity: str,
                 image_stats: tuple[list[float], list[float]], description: str,
                 stats_source: str = "given by the backbone's builder") -> None:
        self.model, self.tokenizer = freeze(model), tokenizer
        cfg = self.model.config
        self.text_cfg, self.vision_cfg = cfg.text_config, cfg.vision_config
        patches = (self.vision_cfg.image_size // self.vision_cfg.patch_size) ** 2
        patch_port = PortSpec(PATCH_PORT, PortKind.INPUT, ("B", patches, self.vision_cfg.hidden_size), "float32",
                              (Op.ADD, Op.READ), "image", "patch embeddings (the patch projection's outputs) "
                              "before [CLS] and the position embeddings join them")
        ports = dual_encoder_ports(self.vision_cfg, self.text_cfg, (cfg.projection_dim, "projected [CLS] embedding"),
                                   (cfg.projection_dim, "projected end-token embedding"), image_inputs=[patch_port])
        image = image_preprocessing(self.vision_cfg.image_size, image_stats, stats_source,
                                    resize="shorter side to image_size, bicubic", crop="center")
        text = text_preprocessing(
            tokenizer, self.text_cfg, insert_position="before the end token",
            long_texts="with tokens inserted at text.token_embeds, a text longer than max_tokens minus their "
                       "number is cut just before its end token (start and end tokens kept) to make room for them",
        )
        self.spec = dual_encoder_spec(backbone_id, ports, image, text, description, identity,
                                      added_ports=(PATCH_PORT,))  # older adapters load

    @classmethod
    def load(cls, source: str) -> HFClip:
        """A ``CLIPModel`` and its tokenizer from a folder (``save_pretrained``) or a hub id."""
        return load_dual_encoder(cls, "hf-clip", "CLIPModel", source, {"clip": "", "siglip": f"use hf-siglip:{source}"},
                                 (OPENAI_MEAN, OPENAI_STD), "OpenAI CLIP's mean/std")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        tokenizer = require_tokenizer(self.tokenizer, self.spec.id, " (random weights for benchmarks)")
        batch = tokenizer(list(texts), padding=True, truncation=True,
                          max_length=self.text_cfg.max_position_embeddings, return_tensors="pt")
        return {"text.input_ids": batch["input_ids"], "text.attention_mask": batch["attention_mask"]}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        lookups = {"text.token_embeds": ("text.input_ids", self.model.text_model.embeddings.token_embedding),
                   PATCH_PORT: ("image.pixels", self._patches)}
        return run_towers(inputs, add, insert, outputs, reads, self._image, self._text, lookups)

    def _image(self, pixels: Tensor, edits: PortEdits) -> Tensor:
        vision, embeddings = self.model.vision_model, self.model.vision_model.embeddings
        patches = edits.read_and_add(PATCH_PORT, self._patches(pixels))  # [B, N, D]
        hidden = torch.cat([embeddings.class_embedding.expand(len(patches), 1, -1), patches], dim=1)  # [B, 1+N, D]
        hidden = vision.pre_layrnorm(hidden + embeddings.position_embedding(embeddings.position_ids))
        hidden = run_vision_layers(vision.encoder.layers, hidden, edits, at=1)  # inserts after [CLS]
        return self.model.visual_projection(vision.post_layernorm(hidden[:, 0]))

    def _patches(self, pixels: Tensor) -> Tensor:
        """``[B, N, D]`` patch embeddings, as ``CLIPVisionEmbeddings`` computes them before [CLS] joins."""
        embeddings = self.model.vision_model.embeddings  # the boundary has checked the pixels' size
        weight = embeddings.patch_embedding.weight
        return embeddings.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)

    def _text(self, inputs: Mapping[str, Tensor], edits: PortEdits) -> Tensor:
        from transformers.masking_utils import create_causal_mask

        eos = self._eos_positions(inputs["text.input_ids"])  # [B]: pooling reads the end token; inserts go before it
        attention = partial(create_causal_mask, config=self.text_cfg, past_key_values=None)
        hidden, eos = run_text_layers(self.model.text_model, inputs, edits, eos, attention=attention,
                                      max_tokens=self.text_cfg.max_position_embeddings, model="CLIP", is_causal=True)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), eos]
        return self.model.text_projection(pooled)

    def _eos_positions(self, ids: Tensor) -> Tensor:
        if self.text_cfg.eos_token_id == 2:  # legacy configs: the end token has the highest id
            return ids.to(torch.int).argmax(dim=-1).long()
        return (ids == self.text_cfg.eos_token_id).int().argmax(dim=-1).long()


@BACKBONES.register("hf-clip:", family_help="dir or hub id")
def build_hf_clip(source: str) -> HFClip:
    return HFClip.load(source)
