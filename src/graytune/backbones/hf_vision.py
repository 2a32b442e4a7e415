"""ViT- and DINOv2-style image encoders from transformers: ``hf-vision:<local dir or hub id>``.

Ports: ``image.pixels`` [B, 3, S, S] (replace); ``image.patch_embeds`` [B, N, D]
(the patch embeddings before the [CLS] token and the position embeddings join
them: add, insert, read when granted; inserted tokens go right after [CLS] with
no position embedding, as visual prompt tokens do); ``image.layer.k`` for
k = 1..n-1 (tokens entering encoder layer k, [CLS] first: add, insert after
[CLS], read when granted); ``image.prompts.k`` (prompt tokens after [CLS] that
each later one writes over: ``tokens.PromptSlots``); ``image.embeds`` [B, D]: the model's pooled output,
the final-layernormed [CLS] (DINOv2, and ViT checkpoints without pooler weights)
or ViT's pooler on it (tanh of a dense layer) when the checkpoint has one. Not
normalised.

S is the config's ``image_size`` for ViT (its position embeddings are used as
they are); for DINOv2 it is the size its image processor crops to (real DINOv2
configs say 518 and their processors crop 224; the model interpolates its
position embeddings, as ``Dinov2Model`` does). Mean and std come from the
folder's ``processor_config.json`` (transformers 5 nests the image processor
there) or ``preprocessor_config.json``, else ImageNet's.

Nothing here downloads on its own: a hub id loads only where the hub is
reachable and allowed; tests use tiny random models they save locally.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from graytune.backbones.base import OneModule, freeze, run_layer
from graytune.backbones.hf_text import hub_config
from graytune.backbones.loading import (
    checkpoint_location,
    file_identity,
    hub_options,
    image_normalisation,
    image_processor_config,
    quiet_loading,
)
from graytune.backbones.ports import prompt_ports
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import PromptSlots, add_delta
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
FAMILIES = ("vit", "dinov2")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


class HFVision(OneModule):
    """A transformers ``ViTModel`` or ``Dinov2Model`` behind the graytune ports.

    Args:
        model: the frozen encoder (a ``ViTModel`` whose ``pooler`` is ``None`` when the checkpoint has none).
        backbone_id: the id the spec carries, e.g. ``hf-vision:/models/dinov2-small``.
        identity: what the fingerprint hashes besides the spec (the weight files' identity).
        image: the spec's image preprocessing (``image_size``, ``mean``, ``std``, ...).
    """

    def __init__(self, model: nn.Module, backbone_id: str, identity: str, image: Mapping[str, Any]) -> None:
        self.model = freeze(model)
        cfg = self.model.config
        self.size, dim = int(image["image_size"]), int(cfg.hidden_size)
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        patches = (self.size // patch) ** 2
        pooled = ("ViT's pooler (tanh of a dense layer) on the final-layernormed [CLS]"
                  if getattr(self.model, "pooler", None) is not None else "the final-layernormed [CLS] token")
        ports = [
            PortSpec("image.pixels", PortKind.INPUT, ("B", 3, self.size, self.size), "float32", (Op.REPLACE,),
                     "image", "RGB pixels, normalised with the spec's mean and std"),
            PortSpec("image.patch_embeds", PortKind.INPUT, ("B", patches, dim), "float32",
                     (Op.ADD, Op.INSERT, Op.READ), "image",
                     "patch embeddings before [CLS] and position embeddings join them; inserted tokens go "
                     "after [CLS], without position embedding"),
            *[PortSpec(f"image.layer.{k}", PortKind.ENTRY, ("B", "N", dim), "float32", (Op.ADD, Op.INSERT, Op.READ),
                       "image", f"tokens entering encoder layer {k}, [CLS] first")
              for k in range(1, cfg.num_hidden_layers)],
            *prompt_ports("image", "N", dim, range(1, cfg.num_hidden_layers)),
            PortSpec("image.embeds", PortKind.OUTPUT, ("B", dim), "float32", (Op.READ,), "image",
                     f"{pooled}, not normalised"),
        ]
        self.spec = BackboneSpec(
            id=backbone_id,
            modalities=("image",),
            ports=tuple(ports),
            preprocess={"image": {**image, "insert_position": "after [CLS]"}},
            description=(f"Hugging Face {type(model).__name__} image encoder from {backbone_id.split(':', 1)[1]}, "
                         f"{self.size} px, {patches} patches, {dim}-d; image.embeds is {pooled}, not normalised."),
        ).with_fingerprint(identity)

    @classmethod
    def load(cls, source: str) -> HFVision:
        """A ``ViTModel``/``Dinov2Model`` and its image preprocessing from a folder or a hub id."""
        try:
            from transformers import AutoModel
        except ImportError as err:
            raise MissingDependencyError("hf-vision backbones need transformers: pip install transformers") from err
        local, where = checkpoint_location("hf-vision", source, "save_pretrained (with its image processor)")
        config = hub_config("hf-vision", source, where, FAMILIES)
        try:
            with quiet_loading():
                model, info = AutoModel.from_pretrained(where, config=config, output_loading_info=True,
                                                        **hub_options())
        except OSError as err:
            raise MissingDependencyError(
                f"hf-vision: could not load an image encoder from {source!r}: {err}; "
                "graytune never downloads on its own: save the model and its image processor to a folder first"
            ) from err
        if getattr(model, "pooler", None) is not None and any(k.startswith("pooler.") for k in info["missing_keys"]):
            model.pooler = None  # the checkpoint has no pooler: its random initialisation would be noise
        weights = sorted(local.glob("*.safetensors")) if local.is_dir() else []
        identity = "+".join(file_identity(w) for w in weights) or f"hub:{source}"
        return cls(model, f"hf-vision:{source}", identity, image_preprocess(where, config))

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        raise InvalidInputError(f"{self.spec.id} has no text tower; it takes image.pixels only")

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        pixels = inputs["image.pixels"]
        if not outputs and set(reads) <= {"image.patch_embeds"}:  # a granted read needing no forward
            return {"image.patch_embeds": self.model.embeddings.patch_embeddings(pixels)}
        read: dict[str, Tensor] = {}
        return {"image.embeds": self._encode(pixels, add, insert, reads, read), **read}

    def _encode(self, pixels: Tensor, add: Mapping[str, Tensor], insert: Mapping[str, Tensor],
                reads: Collection[str], read: dict[str, Tensor]) -> Tensor:
        model, embeddings = self.model, self.model.embeddings
        hidden = embeddings.patch_embeddings(pixels)  # [B, N, D]
        port = "image.patch_embeds"
        if port in reads:
            read[port] = hidden
        if port in add:
            hidden = add_delta(port, hidden, add[port])
        hidden = torch.cat([embeddings.cls_token.expand(len(hidden), -1, -1), hidden], dim=1)  # [B, 1+N, D]
        hidden = hidden + embeddings.interpolate_pos_encoding(hidden, pixels.shape[2], pixels.shape[3])
        hidden = embeddings.dropout(hidden)
        prompts = PromptSlots()
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # every image token is real
        hidden, mask = prompts.place(port, hidden, mask, insert, at=1)  # after [CLS]
        layers = model.layers if hasattr(model, "layers") else model.encoder.layer  # ViT (transformers 5) / DINOv2
        for k, layer in enumerate(layers):
            port = f"image.layer.{k}"
            if port in reads:
                read[port] = hidden
            if port in add:
                hidden = add_delta(port, hidden, add[port])
            hidden, mask = prompts.place(port, hidden, mask, insert, at=1)
            hidden = run_layer(layer, hidden, None)
        cls_token = model.layernorm(hidden[:, :1])  # [B, 1, D]: the layernorm works per token
        pooler = getattr(model, "pooler", None)
        return pooler(cls_token) if pooler is not None else cls_token[:, 0]



def image_preprocess(where: str, config: Any) -> dict[str, Any]:
    """The image size, resizing and mean/std a client applies, from the checkpoint's image processor.

    Mean and std as every graytune loader reads them (``loading.image_normalisation``: the ``image_processor``
    of ``processor_config.json`` as transformers 5 writes it, then ``preprocessor_config.json``), ImageNet's
    when neither gives them; DINOv2's size and crop from the same file.
    """
    mean, std, found = image_normalisation(where, (IMAGENET_MEAN, IMAGENET_STD), "ImageNet's")
    processor = (image_processor_config(where) or ({}, ""))[0]
    size = int(config.image_size)
    crop = _side(processor.get("crop_size")) if processor.get("do_center_crop") else None
    if config.model_type == "dinov2":  # used at its processor's size, position embeddings interpolated
        size = crop or _side(processor.get("size")) or size
    resize = processor.get("size")
    resize = (f"shorter side to {resize['shortest_edge']}" if isinstance(resize, dict) and resize.get("shortest_edge")
              else f"to {size}x{size}")
    return {"image_size": size, "resize": resize, "crop": f"center {size}x{size}" if crop else "none",
            "mean": mean, "std": std, "range": "RGB in [0, 1]", "stats_from": found}


def _side(size: object) -> int | None:
    """The side of a square ``{"height": h, "width": h}`` or ``int`` size, else ``None``."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict) and size.get("height") and size.get("height") == size.get("width"):
        return int(size["height"])
    return None


@BACKBONES.register("hf-vision:", family_help="dir or hub id")
def build_hf_vision(source: str) -> HFVision:
    return HFVision.load(source)
