"""Client-side preprocessing and the Tux Paint caption set (Debian tuxpaint-stamps-default)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import graytune
from graytune import InvalidInputError
from graytune.data.images import ImagePreprocess
from graytune.data.tuxpaint import load_tuxpaint


def test_preprocess_follows_the_spec() -> None:
    spec = graytune.open_backbone("efficientnet-lite0").spec
    pre = ImagePreprocess.from_spec(spec, image_size=64)
    white = Image.new("RGB", (100, 50), "white")
    x = pre([white, white])
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.full_like(x, (1 - 127 / 255) / (128 / 255)))


def test_pad_keeps_the_whole_drawing_and_crop_cuts_it() -> None:
    spec = graytune.open_backbone("efficientnet-lite0").spec
    img = Image.new("RGBA", (200, 100), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 20, 100))  # a red bar at the left edge
    padded = ImagePreprocess.from_spec(spec, 32, fit="pad").square(img)
    cropped = ImagePreprocess.from_spec(spec, 32, fit="crop").square(img)
    red = lambda im: int(((np.asarray(im)[..., 0] > 200) & (np.asarray(im)[..., 1] < 50)).sum())  # noqa: E731
    assert red(padded) > 0 and red(cropped) == 0
    assert padded.getpixel((16, 1)) == (255, 255, 255)  # transparent and padding → white


def test_fixed_size_ports_refuse_other_sizes(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    spec = graytune.open_backbone(f"hf-clip:{tiny_clip_dir}").spec
    assert ImagePreprocess.from_spec(spec).image_size == 32
    with pytest.raises(InvalidInputError, match="takes 32 px images only"):
        ImagePreprocess.from_spec(spec, image_size=64)
    with pytest.raises(InvalidInputError, match="no image tower"):
        ImagePreprocess.from_spec(graytune.open_backbone("minilm").spec)


def test_tuxpaint_has_785_captioned_drawings() -> None:
    data = load_tuxpaint()
    assert len(data) == len(data.captions) == 785
    assert all(p.suffix == ".png" and p.is_file() for p in data.images[:20])
    assert all(c and ".utf8=" not in c for c in data.captions)
    assert data.categories.count("animals") == 146
    sub = data.subset([3, 1])
    assert sub.captions == (data.captions[3], data.captions[1]) and sub.caption_image == (0, 1)
