"""Tasks: how to batch a data set, the loss, and the evaluation, for an adapted model.

Example:
    >>> task = RetrievalTask(train_pairs, preprocess)
    >>> loss = task.loss(model, next(task.batches(32, generator)))
    >>> task.evaluate(model, test_pairs)["mean_recall"]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graytune.data.images import ImagePreprocess
from graytune.data.labeled import LabeledImageFiles, LabeledImages, LabeledTexts
from graytune.data.stream import LoaderConfig, PixelStream
from graytune.data.sketch import SketchSet
from graytune.data.tuxpaint import ImageCaptionSet
from graytune.eval.classification import split_accuracy
from graytune.eval.retrieval import category_metrics, retrieval_metrics
from graytune.model import AdaptedModel

Tensor = torch.Tensor


class Task(Protocol):
    """A task trains on its own data set and evaluates on any set of the same kind."""

    primary: str  # the metric early stopping and model selection use (higher is better)

    def __len__(self) -> int: ...

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[Any]:
        """Batches of ``batch_size`` in the generator's order; with ``shard=(rank, world)`` this rank's
        ``batch_size // world`` rows of each (data-parallel ranks split one global batch)."""
        ...

    def loss(self, model: AdaptedModel, batch: Any) -> Tensor: ...

    def evaluate(self, model: AdaptedModel, data: Any) -> dict[str, float]: ...


class RetrievalTask:
    """Image↔text retrieval: symmetric contrastive loss with the model's learnable temperature."""

    primary = "mean_recall"

    def __init__(self, data: ImageCaptionSet, preprocess: ImagePreprocess, loader: LoaderConfig | None = None,
                 ) -> None:
        self.data, self.preprocess, self.loader = data, preprocess, loader or LoaderConfig()
        self.pixels = image_stream(data, preprocess, self.loader)
        self.first_caption = {}
        for j, i in enumerate(data.caption_image):
            self.first_caption.setdefault(i, j)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[Tensor, list[str]]]:
        groups = epoch_batches(len(self.data), batch_size, generator, shard)
        for idx, pixels in zip(groups, self.pixels.batches(groups)):
            yield pixels, [self.data.captions[self.first_caption[i]] for i in idx]

    @staticmethod
    def encode_visual(model: AdaptedModel, pixels: Tensor) -> Tensor:
        """Images ``[B, 3, S, S]``, or videos ``[B, F, 3, S, S]`` pooled over frames."""
        return model.encode_video(pixels) if pixels.dim() == 5 else model.encode_image(pixels)

    def loss(self, model: AdaptedModel, batch: tuple[Tensor, list[str]]) -> Tensor:
        pixels, captions = batch
        logits = model.similarity(self.encode_visual(model, pixels), model.encode_text(captions))  # [B, B]
        target = torch.arange(len(captions), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @torch.no_grad()
    def evaluate(self, model: AdaptedModel, data: ImageCaptionSet, batch_size: int = 64) -> dict[str, float]:
        pixels = self.pixels if data is self.data else image_stream(data, self.preprocess, self.loader)
        img = torch.cat([self.encode_visual(model, batch).cpu() for batch in pixels.sequential(batch_size)])
        txt = torch.cat([model.encode_text(list(data.captions[i:i + batch_size])).cpu()
                         for i in range(0, len(data.captions), batch_size)])
        return retrieval_metrics(img, txt, data.caption_image)


class ClassificationTask:
    """Classification by similarity to class-name prompts (zero-shot at init), trained with cross-entropy.

    The queries are images (``LabeledImages``) or texts (``LabeledTexts``); the
    classes are always prompts through the text tower, so text adapters train too.
    """

    primary = "accuracy"

    def __init__(self, data: LabeledImages | LabeledTexts, prompt: str, preprocess: ImagePreprocess | None = None,
                 classes: Sequence[int] | None = None, splits: dict[str, Sequence[int]] | None = None,
                 loader: LoaderConfig | None = None) -> None:
        self.data, self.prompt, self.preprocess, self.splits = data, prompt, preprocess, splits
        self.loader = loader or LoaderConfig()
        self.classes = list(classes) if classes is not None else list(range(len(data.class_names)))
        outside = set(data.labels.tolist()) - set(self.classes)
        if outside:
            raise ValueError(f"training samples carry labels {sorted(outside)} outside the trained classes")
        self.pixels = self._queries(data) if isinstance(data, LabeledImages | LabeledImageFiles) else None

    def _queries(self, data: LabeledImages | LabeledImageFiles) -> PixelStream:
        if self.preprocess is None:
            raise ValueError("image classification needs a preprocess")
        return image_stream(data, self.preprocess, self.loader)

    def __len__(self) -> int:
        return len(self.data)

    def prompts(self, classes: Sequence[int]) -> list[str]:
        return [self.prompt.format(self.data.class_names[c]) for c in classes]

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[Any, Tensor]]:
        groups = epoch_batches(len(self.data), batch_size, generator, shard)
        if self.pixels is not None:
            yield from zip(self.pixels.batches(groups), (self.data.labels[idx] for idx in groups))
            return
        for idx in groups:
            yield [self.data.texts[i] for i in idx], self.data.labels[idx]

    def _encode(self, model: AdaptedModel, queries: Any) -> Tensor:
        return model.encode_image(queries) if isinstance(queries, Tensor) else model.encode_text(queries)

    def loss(self, model: AdaptedModel, batch: tuple[Any, Tensor]) -> Tensor:
        queries, labels = batch
        class_emb = model.encode_text(self.prompts(self.classes))  # [C, E]
        position = {c: i for i, c in enumerate(self.classes)}
        target = torch.tensor([position[int(y)] for y in labels], device=class_emb.device)
        return F.cross_entropy(model.similarity(self._encode(model, queries), class_emb), target)

    @torch.no_grad()
    def evaluate(self, model: AdaptedModel, data: LabeledImages | LabeledTexts, batch_size: int = 128,
                 splits: dict[str, Sequence[int]] | None = None) -> dict[str, float]:
        """Accuracy (0–1) among all classes, and among each split's classes on its own samples (base/novel).

        The harmonic mean is of the base and novel accuracies of this one evaluation.
        """
        splits = self.splits if splits is None else splits
        if data is self.data:
            pixels = self.pixels
        else:
            pixels = self._queries(data) if isinstance(data, LabeledImages | LabeledImageFiles) else None
        batches = (pixels.sequential(batch_size) if pixels is not None
                   else (list(data.texts[i:i + batch_size]) for i in range(0, len(data), batch_size)))
        chunks = [self._encode(model, queries).cpu() for queries in tqdm(
            batches, total=-(-len(data) // batch_size), desc="eval", unit="batch", leave=False, disable=None)]
        queries = F.normalize(torch.cat(chunks), dim=-1)
        class_emb = F.normalize(model.encode_text(self.prompts(range(len(data.class_names)))), dim=-1).cpu()
        scores = queries @ class_emb.T  # [N, C]
        out = {"accuracy": float((scores.argmax(1) == data.labels).float().mean())}
        out.update(split_accuracy(scores, data.labels, splits or {}))
        return out


class SketchRetrievalTask:
    """Sketch → image retrieval through one image tower: instance-level contrastive training,
    category-level evaluation (mAP, P@k) plus instance recall@1."""

    primary = "mAP"

    def __init__(self, data: SketchSet, preprocess: ImagePreprocess, loader: LoaderConfig | None = None) -> None:
        self.data, self.preprocess, self.loader = data, preprocess, loader or LoaderConfig()
        self.sketches = PixelStream.of(data.sketches, preprocess, self.loader)
        self.images = PixelStream.of(data.images, preprocess, self.loader)

    def __len__(self) -> int:
        return len(self.data)

    def batches(self, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                ) -> Iterator[tuple[Tensor, Tensor]]:
        groups = epoch_batches(len(self.data), batch_size, generator, shard)
        yield from zip(self.sketches.batches(groups), self.images.batches(groups))

    def loss(self, model: AdaptedModel, batch: tuple[Tensor, Tensor]) -> Tensor:
        sketches, images = batch
        logits = model.similarity(model.encode_image(sketches), model.encode_image(images))
        target = torch.arange(len(sketches), device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    @torch.no_grad()
    def evaluate(self, model: AdaptedModel, data: SketchSet, batch_size: int = 64) -> dict[str, float]:
        same = data is self.data
        sketches = self.sketches if same else PixelStream.of(data.sketches, self.preprocess, self.loader)
        images = self.images if same else PixelStream.of(data.images, self.preprocess, self.loader)
        q = torch.cat([model.encode_image(batch).cpu() for batch in sketches.sequential(batch_size)])
        g = torch.cat([model.encode_image(batch).cpu() for batch in images.sequential(batch_size)])
        out = category_metrics(q, g, data.labels, data.labels)
        top = (F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T).argmax(1)
        out["sketch_recall@1"] = float((top == torch.arange(len(data))).float().mean())
        return out


def image_stream(data: Any, preprocess: ImagePreprocess, loader: LoaderConfig) -> PixelStream:
    """A ``PixelStream`` over a data set's images: ``data.pil(i)`` where it has one, else ``data.images``."""
    where = getattr(data, "where", None)
    if hasattr(data, "pil"):
        return PixelStream(data.pil, len(data), preprocess, loader, where)
    return PixelStream.of(data.images, preprocess, loader, where)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, shard: tuple[int, int] = (0, 1)
                  ) -> list[list[int]]:
    """One epoch's batches of indices in the generator's order: full batches only (a fixed negative count,
    and the trainer's epoch count); with ``shard = (rank, world)``, this rank's contiguous share of each."""
    order = torch.randperm(n, generator=generator).tolist()
    groups = [order[s:s + batch_size] for s in range(0, n - batch_size + 1, batch_size)]
    rank, world = shard
    if world == 1:
        return groups
    share = batch_size // world
    return [g[rank * share:(rank + 1) * share] for g in groups]
