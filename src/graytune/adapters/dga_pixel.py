"""DGA visual input adapter: size-preserving affine conv layers on the pixels, identity at init.

Port ``image.pixels`` (replace), dark-gray: the client sends its own adapted
pixels and gets the vector–Jacobian product back. With ``zeroth_order`` it asks
for no gradient and trains from forward calls alone (``graytune train --zo``), at black-box.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from graytune.adapters.base import ADAPTERS, Adapter, TowerRequest
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel, BackboneSpec


@dataclass
class DGAPixelConfig:
    kernel: int = 3
    """Kernel size of each conv (odd, so the image keeps its size)."""
    depth: int = 1
    """Number of conv layers; no activation between them (the map stays affine)."""
    channels: int = 3
    """Channels between layers (at least 3 so that the identity can pass through)."""
    zeroth_order: bool = False
    """Train from forward calls alone (graytune train --zo): its tensors ask the boundary for no gradient,
    so it runs at black-box (the methods dga-zo and prompt-zo set it)."""


@ADAPTERS.register("dga-pixel")
class DGAPixel(Adapter):
    min_access = AccessLevel.DARK_GRAY
    zo_access = AccessLevel.BLACK_BOX
    config_class = DGAPixelConfig
    port_patterns = ("{m}.pixels",)
    trains = "affine conv layers on the pixels"

    def __init__(self, config: DGAPixelConfig, spec: BackboneSpec, modality: str = "image") -> None:
        super().__init__(config, spec, modality)
        if modality != "image" or config.kernel % 2 == 0 or config.depth < 1 or config.channels < 3:
            raise InvalidInputError(f"dga-pixel: got modality={modality}, {config}; it needs the image tower, "
                                    "an odd kernel, depth >= 1 and channels >= 3")
        sizes = [3] + [config.channels] * (config.depth - 1) + [3]
        self.convs = nn.Sequential(*[nn.Conv2d(a, b, config.kernel, padding=config.kernel // 2)
                                     for a, b in zip(sizes, sizes[1:])])
        for conv in self.convs:
            nn.init.dirac_(conv.weight)  # channel i -> channel i: the identity
            nn.init.zeros_(conv.bias)
        self.requires_grad_(not config.zeroth_order)  # zeroth-order: forward calls only, never a VJP


    def before(self, request: TowerRequest) -> None:
        request.inputs["image.pixels"] = self.convs(request.inputs["image.pixels"])  # [B, 3, H, W]
