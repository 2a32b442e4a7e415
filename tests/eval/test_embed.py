"""Embedding a set in batches: every item once, in order, with a bar counting items on stderr."""

from __future__ import annotations

import torch
from PIL import Image

from graytune.data.images import ImagePreprocess
from graytune.eval.embed import embed_images, embed_texts


class MeanEncoder:
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3))  # [B, 3]

    def encode_text(self, text: list[str]) -> torch.Tensor:
        return torch.tensor([[float(len(t))] for t in text])  # [B, 1]


def test_embeddings_keep_order_and_the_bar_counts_items_on_stderr(tmp_path, capfd) -> None:
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(paths[-1])
    pre = ImagePreprocess(8, "crop", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    images = embed_images(MeanEncoder(), paths, pre, batch_size=2)
    texts = embed_texts(MeanEncoder(), ["a", "bb", "ccc"], batch_size=2)
    out, err = capfd.readouterr()
    assert images.shape == (5, 3) and (images[1:, 0] > images[:-1, 0]).all()  # file order kept
    assert texts.flatten().tolist() == [1.0, 2.0, 3.0]
    assert out == "" and "embed images: 100%" in err and "5/5" in err and "img/s" in err
    assert "embed texts: 100%" in err and "3/3" in err and "text/s" in err
    embed_texts(MeanEncoder(), ["a"], progress=False)
    assert capfd.readouterr() == ("", "")
