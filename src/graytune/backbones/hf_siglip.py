"""Any Hugging Face ``SiglipModel`` checkpoint: ``hf-siglip:<local dir or hub id>``.

SigLIP and the fixed-resolution SigLIP 2 checkpoints (saved as ``SiglipModel`` with a
Gemma tokenizer) load here; SigLIP 2's NaFlex ``Siglip2Model`` (variable resolution,
pixels sent as patches) does not.

Ports: ``image.pixels`` [B, 3, S, S], ``image.layer.k`` (entries into vision layer
k; insert places tokens before the patch tokens: SigLIP has no [CLS], and its
attention-pooling head reads every token), ``image.embeds`` [B, E] (the pooling
head's output); ``text.input_ids``/``text.attention_mask``, ``text.token_embeds``
(add; insert just before the last position), ``text.layer.k``, ``text.embeds``
[B, E]; each tower's ``<m>.prompts.k`` take prompt tokens, placed where inserts at
``<m>.layer.k`` go; each later prompts port writes over them (``tokens.PromptSlots``).
Embeddings are not normalised; ``logit_scale`` and ``logit_bias`` are weights and
stay hidden.

SigLIP's text tower attends in both directions and pools the *last position*,
which is a padding token unless the text fills the context: the model was trained
on texts padded to ``max_tokens`` (64) with every position attended. ``tokenize``
pads that way; inserted tokens go just before the last position, where the
padding they displace was (``access.checks`` makes room for them).

What SigLIP shares with CLIP (loading, the common ports, the tower loops) is in
``dual_encoder``; this file keeps what is SigLIP's own.
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
from graytune.errors import InvalidInputError

Tensor = torch.Tensor
#: SiglipImageProcessor's defaults, used when a checkpoint saves no image processor config
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]


class HFSiglip(OneModule):
    """A transformers ``SiglipModel`` behind the graytune ports.

    Args:
        model: the frozen ``SiglipModel`` (with its vision attention-pooling head).
        tokenizer: its tokenizer, or ``None`` (then clients send ``text.input_ids``).
        backbone_id: the id the spec carries, e.g. ``hf-siglip:/models/siglip``.
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
        if not getattr(self.model.vision_model, "use_head", False):
            raise InvalidInputError(f"{backbone_id}: this SigLIP has no attention-pooling head "
                                    "(vision_use_head is false), so it has no image embedding; "
                                    "load a checkpoint with its head")
        self.max_tokens = int(self.text_cfg.max_position_embeddings)
        self.pad_id = _pad_id(tokenizer, self.text_cfg)
        ports = dual_encoder_ports(
            self.vision_cfg, self.text_cfg,
            (self.vision_cfg.hidden_size, "attention-pooled image embedding (SigLIP's pooling head)"),
            (self.text_cfg.projection_size, "the last position's embedding through the text head"),
        )
        image = image_preprocessing(self.vision_cfg.image_size, image_stats, stats_source,
                                    resize="to image_size x image_size, bicubic (no crop)")
        text = text_preprocessing(
            tokenizer, self.text_cfg,
            padding=f"every text padded on the right to max_tokens with id {self.pad_id}, "
                    "as SigLIP was trained; tokenize() does it",
            attention_mask=self._mask_rule(),
            pooling="the last position (a padding token unless the text fills max_tokens)",
            insert_position="just before the last position",
            long_texts="tokens inserted at text.token_embeds take the places of the padding just before the last "
                       "position; a text with fewer padding positions than inserted tokens is cut just before "
                       "its last token",
            pad_id=self.pad_id,
        )
        self.spec = dual_encoder_spec(backbone_id, ports, image, text, description, identity)

    @classmethod
    def load(cls, source: str) -> HFSiglip:
        """A ``SiglipModel`` and its tokenizer from a folder (``save_pretrained``) or a hub id."""
        model_types = {
            "siglip": "", "clip": f"use hf-clip:{source}",
            "siglip2": "Siglip2Model (NaFlex, variable resolution) is not supported; fixed-resolution "
                       "SigLIP 2 checkpoints saved as SiglipModel load with hf-siglip",
        }
        return load_dual_encoder(cls, "hf-siglip", "SiglipModel", source, model_types, (SIGLIP_MEAN, SIGLIP_STD),
                                 "SiglipImageProcessor's default mean/std")

    def _mask_rule(self) -> str:
        if self.tokenizer is not None and "attention_mask" in getattr(self.tokenizer, "model_input_names", ()):
            return "the tokenizer's: 0 at padding hides it from attention (the last position is still pooled)"
        return ("all ones: padding is attended, as SigLIP was trained (the tokenizer returns no mask); "
                "a 0 hides a position from attention")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        tokenizer = require_tokenizer(self.tokenizer, self.spec.id)
        batch = tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                          padding_side="right", return_tensors="pt")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        return {"text.input_ids": ids, "text.attention_mask": mask}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        lookups = {"text.token_embeds": ("text.input_ids", self.model.text_model.embeddings.token_embedding)}
        return run_towers(inputs, add, insert, outputs, reads, self._image, self._text, lookups)

    def _image(self, pixels: Tensor, edits: PortEdits) -> Tensor:
        vision = self.model.vision_model
        hidden = vision.embeddings(pixels)  # [B, N, D], position embeddings added
        # before the patch tokens: SigLIP has no [CLS], and its pooling head reads every token
        hidden = run_vision_layers(vision.encoder.layers, hidden, edits, at=0)
        return vision.head(vision.post_layernorm(hidden))  # [B, D]

    def _text(self, inputs: Mapping[str, Tensor], edits: PortEdits) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        attention = partial(create_bidirectional_mask, config=self.text_cfg)
        # inserts go just before the last position, which pooling reads
        hidden, _ = run_text_layers(self.model.text_model, inputs, edits, -1, attention=attention,
                                    max_tokens=self.max_tokens, model="SigLIP")
        return self.model.text_model.head(hidden[:, -1])  # SigLIP pools the last position


def _pad_id(tokenizer: object | None, text_cfg: object) -> int:
    """The padding id: the tokenizer's, else the text config's, else 1 (SigLIP's ``</s>``)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(text_cfg, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 1


@BACKBONES.register("hf-siglip:", family_help="dir or hub id")
def build_hf_siglip(source: str) -> HFSiglip:
    return HFSiglip.load(source)
