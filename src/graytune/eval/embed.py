"""Embedding whole data sets through a handle, in batches, with a progress bar.

Example:
    >>> img = embed_images(handle, paths, ImagePreprocess.from_spec(handle.spec))  # [N, E]
    >>> txt = embed_texts(handle, captions)                                          # [M, E]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from graytune.data.images import ImagePreprocess

Tensor = torch.Tensor


class Encoder(Protocol):
    """Anything with the CLIP-style encoders: a handle, or an adapted model."""

    def encode_image(self, pixels: Tensor) -> Tensor: ...

    def encode_text(self, text: Sequence[str]) -> Tensor: ...


@torch.no_grad()
def embed_images(model: Encoder, paths: Sequence[Path], preprocess: ImagePreprocess, batch_size: int = 32,
                 progress: bool = True) -> Tensor:
    """``[N, E]`` image embeddings of the files at ``paths``; ``progress``: a bar (images/s, ETA) on stderr."""
    chunks = []
    with tqdm(total=len(paths), desc="embed images", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            images = []
            for path in paths[start:start + batch_size]:
                with Image.open(path) as im:
                    images.append(im.copy())
            chunks.append(model.encode_image(preprocess(images)).cpu())
            bar.update(len(images))
    return torch.cat(chunks)


@torch.no_grad()
def embed_texts(model: Encoder, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> Tensor:
    """``[M, E]`` text embeddings; ``progress``: a bar (texts/s, ETA) on stderr."""
    chunks = []
    with tqdm(total=len(texts), desc="embed texts", unit="text", disable=not progress) as bar:
        for i in range(0, len(texts), batch_size):
            chunks.append(model.encode_text(list(texts[i:i + batch_size])).cpu())
            bar.update(len(chunks[-1]))
    return torch.cat(chunks)
