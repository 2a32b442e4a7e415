"""A grid of generated images with each prompt as a caption under its image (``graytune generate --out``).

Layout: at most ``COLUMNS`` images a row, in the prompts' order; images smaller than ``MIN_CELL`` pixels a side are
scaled up by a whole factor (nearest neighbour, so no pixel is invented); under each, a caption strip of
``CAPTION_PX`` pixels holds the prompt in Pillow's default font, wrapped to the image's width and cut with "..."
when it does not fit. ``grid_size`` gives the grid's size without drawing it.

Example:
    >>> grid = image_grid(images, ["a red circle", "a blue square"])    # images [2, 3, 64, 64] in [0, 1]
    >>> grid.save("grid.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graytune.errors import InvalidInputError

#: the most images in a row of the grid
COLUMNS = 4
#: images smaller than this many pixels a side are scaled up by a whole factor
MIN_CELL = 128
#: the height of the caption strip under each image, in pixels
CAPTION_PX = 28
#: the file types ``save_grid`` writes
FORMATS = (".png",)


def cell_scale(height: int, width: int) -> int:
    """The whole factor images of ``height`` x ``width`` are scaled up by (1 from ``MIN_CELL`` pixels a side)."""
    return max(1, math.ceil(MIN_CELL / max(1, min(height, width))))


def grid_size(count: int, height: int, width: int) -> tuple[int, int]:
    """``(width, height)`` in pixels of the grid of ``count`` images of ``height`` x ``width``, captions included."""
    columns = min(count, COLUMNS)
    rows = math.ceil(count / columns)
    scale = cell_scale(height, width)
    return columns * width * scale, rows * (height * scale + CAPTION_PX)


def image_grid(images: torch.Tensor, captions: Sequence[str]) -> Any:
    """A PIL image of ``images`` ``[B, 3, H, W]`` in [0, 1], each with its caption under it (see the module)."""
    from PIL import Image, ImageDraw, ImageFont

    count, _, height, width = images.shape
    if count != len(captions):
        raise InvalidInputError(f"{count} images but {len(captions)} captions; give one caption per image")
    scale = cell_scale(height, width)
    grid = Image.new("RGB", grid_size(count, height, width), "white")
    draw, font = ImageDraw.Draw(grid), ImageFont.load_default()
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    for index, (image, caption) in enumerate(zip(pixels, captions)):
        left = (index % COLUMNS) * width * scale
        top = (index // COLUMNS) * (height * scale + CAPTION_PX)
        picture = Image.fromarray(image.permute(1, 2, 0).numpy(), "RGB")
        grid.paste(picture.resize((width * scale, height * scale), Image.Resampling.NEAREST), (left, top))
        text_top = top + height * scale + 2
        for line in caption_lines(caption, width * scale - 4, draw, font):
            draw.text((left + 2, text_top), line, fill="black", font=font)
            text_top += line_height(font)
    return grid


def line_height(font: Any) -> int:
    box = font.getbbox("Ag")
    return int(box[3] - box[1]) + 2


def caption_lines(caption: str, room: int, draw: Any, font: Any) -> list[str]:
    """``caption`` wrapped into lines at most ``room`` pixels wide, as many as the strip holds; a line that is cut
    (a word too long, or words left over after the last line) ends in "..."."""
    most = max(1, (CAPTION_PX - 2) // line_height(font))
    lines: list[str] = []
    words = caption.split()
    while words and len(lines) < most:
        line = words.pop(0)
        while words and draw.textlength(f"{line} {words[0]}", font=font) <= room:
            line = f"{line} {words.pop(0)}"
        cut = draw.textlength(line, font=font) > room or (bool(words) and len(lines) == most - 1)
        while cut and line and draw.textlength(line + "...", font=font) > room:
            line = line[:-1]
        lines.append(line + "..." if cut else line)
    return lines


def check_out(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """``out`` as a path ``save_grid`` may write: a ``.png`` name, not an existing file unless ``overwrite``.

    Raises:
        InvalidInputError: another suffix, or the file exists.
    """
    path = Path(out)
    if path.suffix.lower() not in FORMATS:
        raise InvalidInputError(f"cannot write {path}: the file name must end in {', '.join(FORMATS)}")
    if path.exists() and not overwrite:
        raise InvalidInputError(f"{path} exists; choose another --out or pass --overwrite to replace it")
    return path


def save_grid(images: torch.Tensor, captions: Sequence[str], out: str | os.PathLike[str],
              overwrite: bool = False) -> Path:
    """Write ``image_grid(images, captions)`` to ``out`` (a ``.png``; its folder is made)."""
    path = check_out(out, overwrite)
    grid = image_grid(images, captions)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
