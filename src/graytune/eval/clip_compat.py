"""Hand an adapted model to evaluators written for CLIP-like models (e.g. CLIP_benchmark).

They call ``tokenizer(texts).to(device)``, ``model.encode_text(tokens)`` and
``model.encode_image(transform(pil) stacked)``; this gives them those three. Only
CLIP_benchmark's metric modules (``clip_benchmark.metrics``) are used here: its command line
needs torchvision, which graytune does not install.

Example:
    >>> from clip_benchmark.metrics import zeroshot_retrieval
    >>> model, transform, tokenizer = for_clip_evaluators(AdaptedModel.from_pretrained("out/dga", h))
    >>> zeroshot_retrieval.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from graytune.data.images import ImagePreprocess
from graytune.model import AdaptedModel


def for_clip_evaluators(model: AdaptedModel, image_size: int | None = None, fit: str | None = None) -> tuple[
        AdaptedModel, Callable[[Image.Image], torch.Tensor], Callable[[Sequence[str]], Any]]:
    """``(model, transform, tokenizer)``: a PIL image → ``[3, S, S]``; texts → a batch with ``.to()``.

    The transform prepares images as the adapter was trained on them: at the artifact's image size and fit
    (``model.config``; a drawing set's ``pad``), else the spec's size, cropped. ``image_size`` and ``fit``
    override them.
    """
    from transformers import BatchEncoding

    saved = model.config
    recorded = saved.get("preprocess") or {}
    size = image_size or recorded.get("image_size") or saved.get("image_size")
    preprocess = ImagePreprocess.from_spec(model.handle.spec, size, fit=fit or recorded.get("fit") or "crop")

    def transform(image: Image.Image) -> torch.Tensor:
        return preprocess([image])[0]

    def tokenizer(texts: Sequence[str]) -> BatchEncoding:
        return BatchEncoding(dict(model.tokenize(list(texts))))

    return model, transform, tokenizer
