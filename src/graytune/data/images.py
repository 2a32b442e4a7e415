"""Client-side image preprocessing, driven by the spec's ``preprocess`` (plain data).

Example:
    >>> pre = ImagePreprocess.from_spec(handle.spec, image_size=128)
    >>> pixels = pre([Image.open("cat.png")])  # [B, 3, 128, 128], normalised
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from graytune.errors import InvalidInputError
from graytune.types import BackboneSpec


@dataclass(frozen=True)
class ImagePreprocess:
    """Make a square (centre crop or white padding), resize, scale to [0, 1], normalise.

    Attributes:
        image_size: side of the square the backbone receives.
        fit: ``crop`` (shorter side to size, centre crop: photos) or ``pad``
            (longer side to size, padded with ``background``: drawings, whose
            whole outline matters).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        background: RGB colour transparent pixels are composited onto.
    """

    image_size: int
    fit: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    background: tuple[int, int, int] = (255, 255, 255)

    @classmethod
    def from_spec(cls, spec: BackboneSpec, image_size: int | None = None, fit: str = "crop") -> ImagePreprocess:
        """The preprocessing ``spec`` asks for; ``image_size`` overrides it where the port allows."""
        if fit not in ("crop", "pad"):
            raise InvalidInputError(f"fit must be 'crop' or 'pad', got {fit!r}")
        pre: Mapping[str, Any] = spec.preprocess.get("image", {})
        if not pre:
            raise InvalidInputError(f"backbone {spec.id!r} has no image tower (modalities: {spec.modalities})")
        fixed = spec.port("image.pixels").shape[-1]
        size = image_size or int(pre["image_size"])
        if isinstance(fixed, int) and size != fixed:
            raise InvalidInputError(f"{spec.id} takes {fixed} px images only; got image_size={size}")
        return cls(size, fit, tuple(pre["mean"]), tuple(pre["std"]))  # type: ignore[arg-type]

    def to_rgb(self, image: Image.Image) -> Image.Image:
        """RGB with transparency composited onto ``background``."""
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            canvas = Image.new("RGB", image.size, self.background)
            canvas.paste(image, mask=image.getchannel("A"))
            return canvas
        return image.convert("RGB")

    def square(self, image: Image.Image) -> Image.Image:
        """A centred ``image_size`` square: cropped or padded as ``fit`` says (bicubic resize)."""
        image = self.to_rgb(image)
        w, h = image.size
        if self.fit == "pad":
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), self.background)
            canvas.paste(image, ((side - w) // 2, (side - h) // 2))
            return canvas.resize((self.image_size, self.image_size), Image.BICUBIC)
        scale = self.image_size / min(w, h)
        image = image.resize((max(self.image_size, round(w * scale)), max(self.image_size, round(h * scale))),
                             Image.BICUBIC)
        w, h = image.size
        left, top = (w - self.image_size) // 2, (h - self.image_size) // 2
        return image.crop((left, top, left + self.image_size, top + self.image_size))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` in [0, 1] → normalised."""
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``[B, 3, S, S]`` float32 pixels ready for ``image.pixels``."""
        arrays = [np.asarray(self.square(im), dtype=np.float32) / 255.0 for im in images]
        return self.normalize(torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous())


VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}


def pixel_cache(paths_or_images: Sequence[Any], preprocess: ImagePreprocess, batch: int = 64,
                frames: int = 8) -> torch.Tensor:
    """Preprocessed pixels, computed once (the adapters see the same tensors each epoch).

    ``[N, 3, S, S]`` for images; ``[N, F, 3, S, S]`` when the items are video files (``frames`` each).
    """
    if paths_or_images and Path(str(paths_or_images[0])).suffix.lower() in VIDEO_SUFFIXES:
        from graytune.data.video import sample_frames

        return torch.stack([preprocess(sample_frames(p, frames)) for p in paths_or_images])
    chunks = []
    for i in range(0, len(paths_or_images), batch):
        images = []
        for item in paths_or_images[i:i + batch]:
            if isinstance(item, Image.Image):
                images.append(item)
            else:
                with Image.open(item) as im:
                    images.append(im.copy())
        chunks.append(preprocess(images))
    return torch.cat(chunks) if chunks else torch.zeros(0, 3, preprocess.image_size, preprocess.image_size)
