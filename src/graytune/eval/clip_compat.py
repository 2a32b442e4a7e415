"""Hand an adapted model to evaluators written for CLIP-like models (e.g. CLIP_benchmark).

They call ``tokenizer(texts).to(device)``, ``model.encode_text(tokens)`` and
``model.encode_image(transform(pil) stacked)``; this gives them those three.

Example:
    >>> from clip_benchmark.metrics import zeroshot_retrieval
    >>> model, transform, tokenizer = for_clip_evaluators(adapted)
    >>> zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from graytune.data.images import ImagePreprocess
from graytune.model import AdaptedModel


def for_clip_evaluators(model: AdaptedModel, image_size: int | None = None, fit: str = "crop") -> tuple[
        AdaptedModel, Callable[[Image.Image], torch.Tensor], Callable[[Sequence[str]], Any]]:
    """``(model, transform, tokenizer)``: a PIL image → ``[3, S, S]``; texts → a batch with ``.to()``."""
    from transformers import BatchEncoding

    preprocess = ImagePreprocess.from_spec(model.handle.spec, image_size, fit=fit)

    def transform(image: Image.Image) -> torch.Tensor:
        return preprocess([image])[0]

    def tokenizer(texts: Sequence[str]) -> BatchEncoding:
        return BatchEncoding(dict(model.tokenize(list(texts))))

    return model, transform, tokenizer
