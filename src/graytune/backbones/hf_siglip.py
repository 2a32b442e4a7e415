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
        n_text, n_vision = self.text_cfg.num_hidden_layers, self.vision_cfg.num_hidden_layers
        size, width = self.vision_cfg.image_size, self.vision_cfg.hidden_size
        self.max_tokens = int(self.text_cfg.max_position_embeddings)
        self.pad_id = _pad_id(tokenizer, self.text_cfg)
        mean, std = image_stats
        ports = [
            PortSpec("image.pixels", PortKind.INPUT, ("B", 3, size, size), "float32", (Op.REPLACE,), "image",
                     "RGB pixels, normalised with the spec's mean and std"),
            *[PortSpec(f"image.layer.{k}", PortKind.ENTRY, ("B", "N", width), "float32",
                       (Op.ADD, Op.INSERT, Op.READ), "image", f"tokens entering vision layer {k}")
              for k in range(1, n_vision)],
            *prompt_ports("image", "N", width, range(1, n_vision)),
            *text_ports("text", self.text_cfg.hidden_size, range(1, n_text), self.max_tokens),
            PortSpec("image.embeds", PortKind.OUTPUT, ("B", width), "float32", (Op.READ,), "image",
                     "attention-pooled image embedding (SigLIP's pooling head)"),
            PortSpec("text.embeds", PortKind.OUTPUT, ("B", self.text_cfg.projection_size), "float32", (Op.READ,),
                     "text", "the last position's embedding through the text head"),
        ]
        self.spec = BackboneSpec(
            id=backbone_id,
            modalities=("image", "text"),
            ports=tuple(ports),
            preprocess={
                "image": {"image_size": size, "resize": "to image_size x image_size, bicubic (no crop)",
                          "mean": mean, "std": std, "mean_std_from": stats_source, "range": "RGB in [0, 1]"},
                "text": {"tokenizer": type(tokenizer).__name__ if tokenizer is not None else "none (send ids)",
                         "max_tokens": self.max_tokens,
                         "padding": f"every text padded on the right to max_tokens with id {self.pad_id}, "
                                    "as SigLIP was trained; tokenize() does it",
                         "attention_mask": self._mask_rule(),
                         "pooling": "the last position (a padding token unless the text fills max_tokens)",
                         "insert_position": "just before the last position",
                         "long_texts": "tokens inserted at text.token_embeds take the places of the padding "
                                       "just before the last position; a text with fewer padding positions "
                                       "than inserted tokens is cut just before its last token",
                         "pad_id": self.pad_id,
                         "vocab_size": int(self.text_cfg.vocab_size)},
            },
            description=description,
        ).with_fingerprint(identity)

    @classmethod
    def load(cls, source: str) -> HFSiglip:
        """A ``SiglipModel`` and its tokenizer from a folder (``save_pretrained``) or a hub id."""
        ckpt = load_hf_checkpoint("hf-siglip", source, "SiglipModel", {
            "siglip": "", "clip": f"use hf-clip:{source}",
            "siglip2": "Siglip2Model (NaFlex, variable resolution) is not supported; fixed-resolution "
                       "SigLIP 2 checkpoints saved as SiglipModel load with hf-siglip",
        })
        mean, std, came_from = image_normalisation(ckpt.where, (SIGLIP_MEAN, SIGLIP_STD),
                                                   "SiglipImageProcessor's default mean/std")
        return cls(ckpt.model, ckpt.tokenizer, f"hf-siglip:{source}", ckpt.identity, (mean, std),
                   f"Hugging Face SiglipModel from {source}.", came_from)

    def _mask_rule(self) -> str:
        if self.tokenizer is not None and "attention_mask" in getattr(self.tokenizer, "model_input_names", ()):
            return "the tokenizer's: 0 at padding hides it from attention (the last position is still pooled)"
        return ("all ones: padding is attended, as SigLIP was trained (the tokenizer returns no mask); "
                "a 0 hides a position from attention")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        if self.tokenizer is None:
            raise InvalidInputError(f"{self.spec.id} has no tokenizer; send text.input_ids "
                                    "and text.attention_mask instead of strings")
        batch = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_tokens,
                               padding_side="right", return_tensors="pt")
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids))
        return {"text.input_ids": ids, "text.attention_mask": mask}

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        out: dict[str, Tensor] = {}
        if not outputs and set(reads) <= {"text.token_embeds"}:  # a granted read needing no forward
            if "text.input_ids" in inputs:
                out["text.token_embeds"] = self.model.text_model.embeddings.token_embedding(inputs["text.input_ids"])
            return out
        if "image.pixels" in inputs:
            out["image.embeds"] = self._image(inputs["image.pixels"], add, insert, reads, out)
        if "text.input_ids" in inputs:
            out["text.embeds"] = self._text(inputs, add, insert, reads, out)
        return out

    def _image(self, pixels: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
               reads: Collection[str], out: dict[str, Tensor]) -> Tensor:
        vision = self.model.vision_model
        hidden = vision.embeddings(pixels)  # [B, N, D], position embeddings added
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        prompts = PromptSlots()
        for k, layer in enumerate(vision.encoder.layers):
            port = f"image.layer.{k}"
            if port in reads:
                out[port] = hidden
            if port in add:
                hidden = add_delta(port, hidden, add[port])
            # before the patch tokens; every token is attended and pooled
            hidden, mask = prompts.place(port, hidden, mask, insert, at=0)
            hidden = run_layer(layer, hidden, None)
        return vision.head(vision.post_layernorm(hidden))  # [B, D]

    def _text(self, inputs: Mapping[str, Tensor], add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
              reads: Collection[str], out: dict[str, Tensor]) -> Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        text = self.model.text_model
        ids, mask = inputs["text.input_ids"], inputs["text.attention_mask"]
        hidden = text.embeddings.token_embedding(ids)  # [B, L, D]
        prompts = PromptSlots()
        hidden, mask = self._edit("text.token_embeds", hidden, mask, add, insert, reads, out, prompts)
        if hidden.shape[1] > self.max_tokens:
            raise InvalidInputError(f"{hidden.shape[1]} tokens after insertion exceed this SigLIP's "
                                    f"{self.max_tokens} positions; send shorter texts or fewer tokens")
        hidden = text.embeddings(inputs_embeds=hidden)
        attn, length = None, -1
        for k, layer in enumerate(text.encoder.layers):
            hidden, mask = self._edit(f"text.layer.{k}", hidden, mask, add, insert, reads, out, prompts)
            if hidden.shape[1] != length:
                length = hidden.shape[1]
                attn = create_bidirectional_mask(config=self.text_cfg, inputs_embeds=hidden, attention_mask=mask)
            hidden = run_layer(layer, hidden, attn)
        hidden = text.final_layer_norm(hidden)
        return text.head(hidden[:, -1])  # SigLIP pools the last position

    @staticmethod
    def _edit(port: str, hidden: Tensor, mask: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
              reads: Collection[str], out: dict[str, Tensor], prompts: PromptSlots) -> tuple[Tensor, Tensor]:
        if port in reads:
            out[port] = hidden
        if port in add:
            hidden = add_delta(port, hidden, add[port], mask)
        return prompts.place(port, hidden, mask, insert, at=-1)  # just before the last position, which pooling reads



def _pad_id(tokenizer: object | None, text_cfg: object) -> int:
    """The padding id: the tokenizer's, else the text config's, else 1 (SigLIP's ``</s>``)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(text_cfg, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 1


@BACKBONES.register("hf-siglip:", family_help="dir or hub id")
def build_hf_siglip(source: str) -> HFSiglip:
    return HFSiglip.load(source)
