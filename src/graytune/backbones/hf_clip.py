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
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from graytune.backbones.base import OneModule, freeze, run_layer
from graytune.backbones.loading import image_normalisation, load_hf_checkpoint
from graytune.backbones.ports import prompt_ports, text_ports
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PromptSlots, add_delta
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

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
        n_text, n_vision = self.text_cfg.num_hidden_layers, self.vision_cfg.num_hidden_layers
        size, dim = self.vision_cfg.image_size, cfg.projection_dim
        patches = (size // self.vision_cfg.patch_size) ** 2
        proc_mean, proc_std = image_stats
        ports = [
            PortSpec("image.pixels", PortKind.INPUT, ("B", 3, size, size), "float32", (Op.REPLACE,), "image",
                     "RGB pixels, normalised with the spec's mean and std"),
            PortSpec(PATCH_PORT, PortKind.INPUT, ("B", patches, self.vision_cfg.hidden_size), "float32",
                     (Op.ADD, Op.READ), "image", "patch embeddings (the patch projection's outputs) before [CLS] "
                     "and the position embeddings join them"),
            *[PortSpec(f"image.layer.{k}", PortKind.ENTRY, ("B", "N", self.vision_cfg.hidden_size), "float32",
                       (Op.ADD, Op.INSERT, Op.READ), "image", f"tokens entering vision layer {k}")
              for k in range(1, n_vision)],
            *prompt_ports("image", "N", self.vision_cfg.hidden_size, range(1, n_vision)),
            *text_ports("text", self.text_cfg.hidden_size, range(1, n_text), self.text_cfg.max_position_embeddings),
            PortSpec("image.embeds", PortKind.OUTPUT, ("B", dim), "float32", (Op.READ,), "image",
                     "projected [CLS] embedding"),
            PortSpec("text.embeds", PortKind.OUTPUT, ("B", dim), "float32", (Op.READ,), "text",
                     "projected end-token embedding"),
        ]
        self.spec = BackboneSpec(
            id=backbone_id,
            modalities=("image", "text"),
            ports=tuple(ports),
            preprocess={
                "image": {"image_size": size, "resize": "shorter side to image_size, bicubic",
                          "crop": "center", "mean": proc_mean, "std": proc_std, "mean_std_from": stats_source,
                          "range": "RGB in [0, 1]"},
                "text": {"tokenizer": type(tokenizer).__name__ if tokenizer is not None else "none (send ids)",
                         "max_tokens": self.text_cfg.max_position_embeddings,
                         "insert_position": "before the end token",
                         "long_texts": "with tokens inserted at text.token_embeds, a text longer than max_tokens "
                                       "minus their number is cut just before its end token (start and end "
                                       "tokens kept) to make room for them",
                         "vocab_size": int(self.text_cfg.vocab_size)},
            },
            description=description,
        ).with_fingerprint(identity, added_ports=(PATCH_PORT,))  # older adapters load

    @classmethod
    def load(cls, source: str) -> HFClip:
        """A ``CLIPModel`` and its tokenizer from a folder (``save_pretrained``) or a hub id."""
        ckpt = load_hf_checkpoint("hf-clip", source, "CLIPModel",
                                  {"clip": "", "siglip": f"use hf-siglip:{source}"})
        mean, std, came_from = image_normalisation(ckpt.where, (OPENAI_MEAN, OPENAI_STD), "OpenAI CLIP's mean/std")
        return cls(ckpt.model, ckpt.tokenizer, f"hf-clip:{source}", ckpt.identity, (mean, std),
                   f"Hugging Face CLIPModel from {source}.", came_from)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            raise InvalidInputError(f"{self.spec.id} has no tokenizer (random weights for benchmarks); "
                                    "send text.input_ids and text.attention_mask instead of strings")
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.text_cfg.max_position_embeddings, return_tensors="pt")
        return {"text.input_ids": batch["input_ids"], "text.attention_mask": batch["attention_mask"]}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        out: dict[str, Tensor] = {}
        if not outputs and set(reads) <= {"text.token_embeds", PATCH_PORT}:  # granted reads needing no forward
            if "text.input_ids" in inputs and "text.token_embeds" in reads:
                out["text.token_embeds"] = self.model.text_model.embeddings.token_embedding(inputs["text.input_ids"])
            if "image.pixels" in inputs and PATCH_PORT in reads:
                out[PATCH_PORT] = self._patches(inputs["image.pixels"])
            return out
        if "image.pixels" in inputs:
            out["image.embeds"] = self._image(inputs["image.pixels"], add, insert, reads, out)
        if "text.input_ids" in inputs:
            out["text.embeds"] = self._text(inputs, add, insert, reads, out)
        return out

    def _image(self, pixels: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
               reads: Collection[str], out: dict[str, Tensor]) -> Tensor:
        vision, embeddings = self.model.vision_model, self.model.vision_model.embeddings
        patches = self._patches(pixels)  # [B, N, D]
        if PATCH_PORT in reads:
            out[PATCH_PORT] = patches
        if PATCH_PORT in add:
            patches = add_delta(PATCH_PORT, patches, add[PATCH_PORT])
        hidden = torch.cat([embeddings.class_embedding.expand(len(patches), 1, -1), patches], dim=1)  # [B, 1+N, D]
        hidden = vision.pre_layrnorm(hidden + embeddings.position_embedding(embeddings.position_ids))
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        prompts = PromptSlots()
        for k, layer in enumerate(vision.encoder.layers):
            port = f"image.layer.{k}"
            if port in reads:
                out[port] = hidden
            if port in add:
                hidden = add_delta(port, hidden, add[port])
            hidden, mask = prompts.place(port, hidden, mask, insert, at=1)  # after [CLS]
            hidden = run_layer(layer, hidden, None)
        return self.model.visual_projection(vision.post_layernorm(hidden[:, 0]))

    def _patches(self, pixels: Tensor) -> Tensor:
        """``[B, N, D]`` patch embeddings, as ``CLIPVisionEmbeddings`` computes them before [CLS] joins."""
        embeddings = self.model.vision_model.embeddings  # the boundary has checked the pixels' size
        weight = embeddings.patch_embedding.weight
        return embeddings.patch_embedding(pixels.to(weight.dtype)).flatten(2).transpose(1, 2)

    def _text(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
              reads: Collection[str], out: dict[str, Tensor]) -> Tensor:
        from transformers.masking_utils import create_causal_mask

        text = self.model.text_model
        ids, mask = inputs["text.input_ids"], inputs["text.attention_mask"]
        eos = self._eos_positions(ids)  # [B]
        hidden = text.embeddings.token_embedding(ids)  # [B, L, D]
        prompts = PromptSlots()
        hidden, mask, eos = self._edit("text.token_embeds", hidden, mask, eos, add, insert, reads, out, prompts)
        limit = self.text_cfg.max_position_embeddings
        if hidden.shape[1] > limit:
            raise InvalidInputError(f"{hidden.shape[1]} tokens after insertion exceed this CLIP's {limit} "
                                    "positions; send shorter texts or fewer tokens")
        hidden = text.embeddings(inputs_embeds=hidden)
        attn, length = None, -1
        for k, layer in enumerate(text.encoder.layers):
            hidden, mask, eos = self._edit(f"text.layer.{k}", hidden, mask, eos, add, insert, reads, out, prompts)
            if hidden.shape[1] != length:
                length = hidden.shape[1]
                attn = create_causal_mask(config=self.text_cfg, inputs_embeds=hidden,
                                          attention_mask=mask, past_key_values=None)
            hidden = run_layer(layer, hidden, attn, is_causal=True)
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(len(hidden), device=hidden.device), eos]
        return self.model.text_projection(pooled)

    def _eos_positions(self, ids: Tensor) -> Tensor:
        if self.text_cfg.eos_token_id == 2:  # legacy configs: the end token has the highest id
            return ids.to(torch.int).argmax(dim=-1).long()
        return (ids == self.text_cfg.eos_token_id).int().argmax(dim=-1).long()

    @staticmethod
    def _edit(port: str, hidden: Tensor, mask: Tensor, eos: Tensor, add: Mapping[str, Tensor],
              insert: Mapping[str, Tensor], reads: Collection[str], out: dict[str, Tensor],
              prompts: PromptSlots) -> tuple[Tensor, Tensor, Tensor]:
        if port in reads:
            out[port] = hidden
        if port in add:
            hidden = add_delta(port, hidden, add[port], mask)
        if port in insert:  # before the end token, which pooling reads
            hidden, mask = prompts.insert(port, hidden, mask, insert[port], eos)
            eos = eos + insert[port].shape[1]
        length = hidden.shape[1]
        hidden, mask = prompts.take(port, hidden, mask, insert, eos)  # before the end token too
        return hidden, mask, eos + (hidden.shape[1] - length)



@BACKBONES.register("hf-clip:", family_help="dir or hub id")
def build_hf_clip(source: str) -> HFClip:
    return HFClip.load(source)
