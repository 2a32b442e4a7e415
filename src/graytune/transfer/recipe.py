"""TransMiter runs on the real data sets: extract from a weak fine-tuned adapter, transfer, evaluate.

Used by ``scripts/transmiter_results.py``. Images are classified by class-name prompts (CLIP
style); unlabeled images come from the training split with their labels dropped.

Example:
    >>> px = load_pixels(load_splits("fashion-mnist:base-to-novel"), weak_handle, 64)
    >>> base_novel_accuracy(tm.predict(strong, px.test), px.test_labels, (0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from graytune.access import LocalHandle
from graytune.data.catalog import Splits
from graytune.data.images import ImagePreprocess, pixel_cache
from graytune.errors import InvalidInputError
from graytune.transfer.transmiter import PlusConfig, TransMiter

Tensor = torch.Tensor


@dataclass
class Pixels:
    """Preprocessed images of one data set's splits at one size (shared by every backbone of a family)."""

    unlabeled: Tensor
    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    test: Tensor
    test_labels: Tensor


def load_pixels(splits: Splits, handle: LocalHandle, image_size: int, unlabeled: Any,
                shots: int | None = None) -> Pixels:
    """Pixels of the ``unlabeled`` images (labels unused), a labelled ``shots``-per-class subset of train, val, test.

    ``unlabeled`` is any set with ``pil(i)``; keep it disjoint from ``splits.val`` and ``splits.test``.
    """
    if splits.task != "classification" or not hasattr(splits.train, "pil"):
        raise InvalidInputError(f"TransMiter runs on image classification sets; {splits.name} is {splits.task}")
    pre = ImagePreprocess.from_spec(handle.spec, image_size, fit=splits.fit)

    def pixels(data: Any, idx: list[int]) -> Tensor:
        return pixel_cache([data.pil(i) for i in idx], pre)

    labels = splits.train.labels
    few = list(range(len(labels)))
    if shots:
        few = [i for c in sorted(set(labels.tolist())) for i in (labels == c).nonzero().flatten().tolist()[:shots]]
    return Pixels(pixels(unlabeled, list(range(len(unlabeled)))), pixels(splits.train, few), labels[few],
                  pixels(splits.val, list(range(len(splits.val)))), splits.val.labels,
                  pixels(splits.test, list(range(len(splits.test)))), splits.test.labels)


def base_novel_accuracy(scores: Tensor, labels: Tensor, base: tuple[int, ...], novel: tuple[int, ...]
                        ) -> dict[str, float]:
    """Accuracy among base classes on base samples, among novel on novel, and their harmonic mean (%)."""
    out = {}
    for name, classes in (("base", base), ("novel", novel)):
        cls = torch.as_tensor(classes)
        rows = torch.isin(labels, cls)
        pred = cls[scores[rows][:, cls].argmax(1)]
        out[f"{name}_accuracy"] = 100.0 * float((pred == labels[rows]).float().mean())
    b, n = out["base_accuracy"], out["novel_accuracy"]
    out["harmonic_mean"] = 2 * b * n / (b + n) if b + n else 0.0
    return out


def plus(tm: TransMiter, strong: LocalHandle, pixels: Pixels, seed: int = 0) -> dict[str, float]:
    """TransMiter+: fine-tune the transferred adapter on the labelled few-shot set, select on val."""
    return tm.finetune(tm.scores(strong, pixels.train), pixels.train_labels, tm.scores(strong, pixels.val),
                       pixels.val_labels, PlusConfig(seed=seed))
