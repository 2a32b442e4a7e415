"""Labelled real data: Fashion-MNIST images (IDX) and WordNet noun glosses by supersense.

Example:
    >>> train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    >>> train.class_names[0], train.images.shape
    ('T-shirt/top', torch.Size([60000, 28, 28]))
"""

from __future__ import annotations

import gzip
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from graytune.assets import debian_file, wordnet_nouns
from graytune.errors import InvalidInputError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")


@dataclass(frozen=True)
class LabeledImages:
    """Greyscale images ``[N, H, W]`` uint8 with labels; ``pil(i)`` gives an RGB image, dark on light."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        return Image.fromarray(255 - self.images[index].numpy()).convert("RGB")  # inverted: ImageNet-like

    def subset(self, indices: Sequence[int]) -> LabeledImages:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return LabeledImages(self.name, self.images[idx], self.labels[idx], self.class_names)


@dataclass(frozen=True)
class LabeledImageFiles:
    """Image files with labels (an image folder: one sub-folder per class)."""

    name: str
    paths: tuple[Path, ...]
    labels: torch.Tensor
    class_names: tuple[str, ...]
    origins: tuple[str, ...] = ()  # per image, where it was listed (``labels.csv row 7``), for errors

    def __len__(self) -> int:
        return len(self.labels)

    def pil(self, index: int) -> Image.Image:
        item = self.paths[index]
        source = io.BytesIO(item.read_bytes()) if not isinstance(item, str | Path) else item
        with Image.open(source) as image:
            return image.convert("RGB")

    def where(self, index: int) -> str:
        """Image ``index``'s file and the row that named it."""
        return f"{self.paths[index]} ({self.origins[index]})" if self.origins else str(self.paths[index])

    def subset(self, indices: Sequence[int]) -> LabeledImageFiles:
        return LabeledImageFiles(self.name, tuple(self.paths[i] for i in indices),
                                 self.labels[torch.as_tensor(list(indices), dtype=torch.long)], self.class_names,
                                 tuple(self.origins[i] for i in indices) if self.origins else ())


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def load_image_folder(root: str | Path) -> LabeledImageFiles:
    """``root/<class>/<image>``: classes are the sub-folder names, sorted."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if len(classes) < 2 or not paths:
        raise InvalidInputError(f"{root}: an image folder needs at least 2 class sub-folders holding images "
                                f"({', '.join(sorted(IMAGE_SUFFIXES))}), or, for a diffusion model, images of one "
                                f"concept in the folder itself and no sub-folders; found {len(classes)} folders, "
                                f"{len(paths)} images in them")
    return LabeledImageFiles(root.name, tuple(paths), torch.tensor(labels), tuple(classes))


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with labels."""

    name: str
    texts: tuple[str, ...]
    labels: torch.Tensor
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]) -> LabeledTexts:
        return LabeledTexts(self.name, tuple(self.texts[i] for i in indices),
                            self.labels[torch.as_tensor(list(indices), dtype=torch.long)], self.class_names)


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST family), gzipped or not, as a numpy array."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 8:
        raise InvalidInputError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InvalidInputError(f"{path}: header says {dims} but holds {data.size} values; the file is truncated")
    return data.reshape(dims)


def load_fashion_mnist(split: str = "train") -> LabeledImages:
    """Fashion-MNIST from Debian ``dataset-fashion-mnist``; ``split`` is ``train`` or ``test``."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise InvalidInputError(f"fashion-mnist split must be 'train' or 'test', got {split!r}")
    images = read_idx(debian_file("dataset-fashion-mnist", f"/{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(debian_file("dataset-fashion-mnist", f"/{prefix}-labels-idx1-ubyte.gz"))
    return LabeledImages(f"fashion-mnist-{split}", torch.from_numpy(images.copy()),
                         torch.from_numpy(labels.astype(np.int64)), FASHION_CLASSES)


#: WordNet lexicographer files used as classes (DESIGN.md §6: 10 supersenses).
SUPERSENSES = {5: "animal", 6: "artifact", 18: "person", 20: "plant", 13: "food", 15: "location", 8: "body",
               10: "communication", 4: "act", 27: "substance"}


def load_wordnet_supersenses(per_class: int = 500, seed: int = 0) -> LabeledTexts:
    """Noun glosses labelled by supersense: ``per_class`` drawn per class with ``seed`` (sorted ids first)."""
    by_class: dict[int, list[str]] = {k: [] for k in SUPERSENSES}
    for _wnid, (lexfile, _lemmas, gloss) in sorted(wordnet_nouns().items()):
        if lexfile in by_class and gloss:
            by_class[lexfile].append(gloss)
    rng = random.Random(seed)
    texts, labels = [], []
    for label, lexfile in enumerate(SUPERSENSES):
        pool = by_class[lexfile]
        for gloss in rng.sample(pool, min(per_class, len(pool))):
            texts.append(gloss)
            labels.append(label)
    return LabeledTexts("wordnet-supersense", tuple(texts), torch.tensor(labels), tuple(SUPERSENSES.values()))
