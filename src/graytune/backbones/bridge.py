"""An image–text dual encoder composed from two real models; not contrastively trained.

``bridge:efficientnet-lite0+minilm``: image → EfficientNet ImageNet class
probabilities → their weighted mean of MiniLM embeddings of the class names
("a picture of a {name}", names from WordNet) → MiniLM's 384-d text space.
Text → MiniLM. Gradients reach pixels and token embeddings, so every
dual-encoder method runs on real weights; report it as a composite bridge.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import nn

from graytune.assets import imagenet_class_names
from graytune.backbones.efficientnet import load_tower as load_image_tower
from graytune.backbones.minilm import DIM
from graytune.backbones.minilm import load_tower as load_text_tower
from graytune.backbones.registry import BACKBONES
from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor
PROMPT = "a picture of a {}"


@functools.cache
def class_text_embeddings(batch: int = 64) -> Tensor:
    """``[1000, 384]`` MiniLM embeddings of the ImageNet class prompts (computed once)."""
    tower = load_text_tower()
    prompts = [PROMPT.format(name) for name in imagenet_class_names()]
    chunks = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            pooled, _ = tower.run(tower.tokenize(prompts[i:i + batch]), {}, {}, ())
            chunks.append(pooled)
    return torch.cat(chunks)


class _BridgeModule(nn.Module):
    """The white-box view: both real towers and the fixed class-text matrix."""

    def __init__(self, image: nn.Module, text: nn.Module, class_text: Tensor) -> None:
        super().__init__()
        self.image, self.text = image, text
        self.register_buffer("class_text", class_text)


class Bridge:
    """A dual encoder from an EfficientNet-Lite image tower and the MiniLM text tower."""

    def __init__(self, image_name: str) -> None:
        self.image_tower = load_image_tower(image_name)
        self.text_tower = load_text_tower()
        self.class_text = class_text_embeddings()  # [1000, D]
        outputs = [
            PortSpec("image.embeds", PortKind.OUTPUT, ("B", DIM), "float32", (Op.READ,), "image",
                     "ImageNet class probabilities × class-name embeddings (MiniLM space)"),
            PortSpec("logits", PortKind.OUTPUT, ("B", 1000), "float32", (Op.READ,), "image",
                     "the image tower's ImageNet-1k logits"),
            PortSpec("text.embeds", PortKind.OUTPUT, ("B", DIM), "float32", (Op.READ,), "text",
                     "mean-pooled MiniLM sentence embedding"),
        ]
        ports = (*self.image_tower.ports(), *self.text_tower.ports(), *outputs)
        text_pre = {"tokenizer": "MiniLM wordpiece", "max_tokens": 128, "insert_position": "after [CLS]",
                    **self.text_tower.room_for_inserts(), "vocab_size": self.text_tower.vocab_size}
        self.spec = BackboneSpec(
            id=f"bridge:{image_name}+minilm",
            modalities=("image", "text"),
            ports=ports,
            preprocess={"image": self.image_tower.preprocess(), "text": text_pre},
            description=(
                f"Composite image–text bridge: {image_name} ImageNet probabilities mapped into MiniLM's "
                f"space through MiniLM embeddings of '{PROMPT}' for the 1000 WordNet class names. "
                "Real parts, not contrastively trained."
            ),
        ).with_fingerprint(f"{self.image_tower.weights_identity}+{self.text_tower.weights_identity}")

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        return self.text_tower.tokenize(texts)

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        out: dict[str, Tensor] = {}
        image_needed = bool({"image.embeds", "logits"} & set(outputs)) or any(r.startswith("image.") for r in reads)
        if "image.pixels" in inputs and image_needed:
            _, logits, read = self.image_tower.run(inputs["image.pixels"], add, reads)
            out.update(read, logits=logits, **{"image.embeds": logits.softmax(-1) @ self.class_text})
        if "text.input_ids" in inputs:
            lookup_only = not outputs and set(reads) <= {"text.token_embeds"}
            pooled, read = self.text_tower.run(inputs, add, insert, reads, lookup_only=lookup_only)
            out.update(read, **({} if lookup_only else {"text.embeds": pooled}))
        return out

    def module(self) -> nn.Module:
        return _BridgeModule(self.image_tower.model, self.text_tower.encoder, self.class_text)

    def with_module(self, module: nn.Module) -> Bridge:
        if not isinstance(module, _BridgeModule):
            raise InvalidInputError(f"{self.spec.id} runs the module its module() returns; got {type(module).__name__}")
        other = copy.copy(self)
        other.image_tower, other.text_tower = copy.copy(self.image_tower), copy.copy(self.text_tower)
        other.image_tower.model, other.text_tower.encoder = module.image, module.text
        other.class_text = module.class_text
        return other


for _image in ("efficientnet-lite0", "efficientnet-lite1"):
    BACKBONES.register(f"bridge:{_image}+minilm")(functools.partial(Bridge, _image))
