"""Derived sketches: edge maps of the Tux Paint drawings, as queries against the drawings.

No real sketch set ships in a package here; these are *derived* (Pillow's edge
filter on each drawing composited on white, dark lines on white), and every
report says so. Labels are the drawings' Tux Paint categories, for
category-level metrics (mAP, P@k).

Example:
    >>> pairs = load_sketches()
    >>> pairs.sketches[0].size, pairs.labels[0]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFilter, ImageOps

from graytune.data.tuxpaint import ImageCaptionSet, load_tuxpaint


@dataclass(frozen=True)
class SketchSet:
    """Sketch ``i`` is drawn from photo/drawing ``i``; both carry ``labels[i]``."""

    name: str
    sketches: tuple[Image.Image, ...]
    images: tuple[Path, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: list[int]) -> SketchSet:
        return SketchSet(self.name, tuple(self.sketches[i] for i in indices), tuple(self.images[i] for i in indices),
                         tuple(self.labels[i] for i in indices), self.label_names)


def edge_map(image: Image.Image, threshold: int = 40) -> Image.Image:
    """Dark edges on white, from ``image`` composited on white."""
    rgba = image.convert("RGBA")
    canvas = Image.new("RGB", rgba.size, "white")
    canvas.paste(rgba, mask=rgba.getchannel("A"))
    edges = canvas.convert("L").filter(ImageFilter.FIND_EDGES)
    return ImageOps.invert(edges.point(lambda v: 255 if v > threshold else 0)).convert("RGB")


def sketches_of(data: ImageCaptionSet) -> SketchSet:
    names = tuple(sorted(set(data.categories)))
    sketches = []
    for path in data.images:
        with Image.open(path) as im:
            sketches.append(edge_map(im))
    return SketchSet(f"{data.name}-sketch", tuple(sketches), tuple(data.images),
                     tuple(names.index(c) for c in data.categories), names)


def load_sketches() -> SketchSet:
    """Edge maps of all 785 captioned Tux Paint drawings, with the drawings and their categories."""
    return sketches_of(load_tuxpaint())


def load_sketch_folders(root: str | Path) -> SketchSet:
    """``root/sketch/<class>/<name>.*`` paired with ``root/photo/<class>/<name>.*`` (same class and stem)."""
    from graytune.data.labeled import IMAGE_SUFFIXES
    from graytune.errors import InvalidInputError

    root = Path(root)
    classes = sorted(p.name for p in (root / "sketch").iterdir() if p.is_dir())
    sketches, photos, labels = [], [], []
    for label, name in enumerate(classes):
        photo_by_stem = {p.stem: p for p in (root / "photo" / name).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES}
        for sketch in sorted((root / "sketch" / name).glob("*")):
            if sketch.suffix.lower() in IMAGE_SUFFIXES and sketch.stem in photo_by_stem:
                with Image.open(sketch) as im:
                    sketches.append(im.convert("RGB"))
                photos.append(photo_by_stem[sketch.stem])
                labels.append(label)
    if len(photos) < 10:
        raise InvalidInputError(f"{root}: found {len(photos)} sketch/photo pairs; pairs share a class folder and "
                                "a file stem under sketch/ and photo/, and at least 10 are needed to split")
    return SketchSet(root.name, tuple(sketches), tuple(photos), tuple(labels), tuple(classes))
