"""Tux Paint stamps: 785 real drawings, each with a one-line English caption (Debian package).

Example:
    >>> pairs = load_tuxpaint()
    >>> pairs.captions[0], pairs.categories[0]
    ('A frog.', 'animals')
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from graytune.assets import debian_files

PACKAGE = "tuxpaint-stamps-default"


@dataclass(frozen=True)
class ImageCaptionSet:
    """Images with captions; ``caption_image[j]`` is the index of caption j's image.

    Several captions may point at one image (COCO-style); here there is one each.
    """

    name: str
    images: tuple[Path, ...]
    captions: tuple[str, ...]
    caption_image: tuple[int, ...]
    categories: tuple[str, ...]  # one per image
    origins: tuple[str, ...] = ()  # per image, where it was listed (``pairs.csv row 7``), for errors

    def __len__(self) -> int:
        return len(self.images)

    def where(self, index: int) -> str:
        """Image ``index``'s file and the row that named it."""
        return f"{self.images[index]} ({self.origins[index]})" if self.origins else str(self.images[index])

    def subset(self, indices: list[int]) -> ImageCaptionSet:
        """The images at ``indices`` with their captions, re-indexed."""
        by_image: dict[int, list[str]] = {}
        for caption, image in zip(self.captions, self.caption_image):
            by_image.setdefault(image, []).append(caption)
        caps = [(c, new) for new, old in enumerate(indices) for c in by_image.get(old, [])]
        return ImageCaptionSet(self.name, tuple(self.images[i] for i in indices), tuple(c for c, _ in caps),
                               tuple(i for _, i in caps), tuple(self.categories[i] for i in indices),
                               tuple(self.origins[i] for i in indices) if self.origins else ())


def english_caption(path: Path) -> str | None:
    """The first line of a stamp's ``.txt``, the English one; ``None`` when absent or translated."""
    try:
        first = path.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return None
    return first if first and ".utf8=" not in first else None


def load_tuxpaint() -> ImageCaptionSet:
    """Every captioned PNG stamp, sorted by path (a stable order for seeds and splits)."""
    images, captions, categories = [], [], []
    for png in sorted(debian_files(PACKAGE, ".png")):
        caption = english_caption(png.with_suffix(".txt"))
        if caption is None:
            continue
        parts = png.parts
        category = parts[parts.index("stamps") + 1] if "stamps" in parts else png.parent.name
        images.append(png)
        captions.append(caption)
        categories.append(category)
    return ImageCaptionSet("tuxpaint", tuple(images), tuple(captions), tuple(range(len(images))),
                           tuple(categories))
