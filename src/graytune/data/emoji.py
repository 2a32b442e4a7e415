"""Emoji images with their Unicode names: Noto Color Emoji (Debian) rendered with Pillow.

Every single-code-point emoji in the font's character map whose Unicode
category is ``So`` becomes a 136×128 image on white, captioned with its
lower-cased Unicode name ("hammer", "couple with heart").

Example:
    >>> data = load_emoji()
    >>> len(data), data.captions[0]
"""

from __future__ import annotations

import functools
import unicodedata

from PIL import Image, ImageDraw, ImageFont

from graytune.assets import debian_file
from graytune.data.tuxpaint import ImageCaptionSet

PACKAGE = "fonts-noto-color-emoji"
SIZE = 109  # the only size at which FreeType draws this font's colour bitmaps


@functools.cache
def load_emoji(limit: int | None = None) -> ImageCaptionSet:
    """The rendered emoji (sorted by code point); ``limit`` keeps the first N."""
    from fontTools.ttLib import TTFont

    path = debian_file(PACKAGE, "NotoColorEmoji.ttf")
    cmap = TTFont(str(path), lazy=True).getBestCmap()
    chars = [chr(cp) for cp in sorted(cmap) if cp > 0xFF and unicodedata.category(chr(cp)) == "So"
             and unicodedata.name(chr(cp), "")][:limit]
    font = ImageFont.truetype(str(path), SIZE)
    images = []
    for ch in chars:
        image = Image.new("RGB", (136, 128), "white")
        ImageDraw.Draw(image).text((0, 0), ch, font=font, embedded_color=True)
        images.append(image)
    names = tuple(unicodedata.name(ch).lower() for ch in chars)
    return ImageCaptionSet("emoji", tuple(images), names, tuple(range(len(chars))), tuple("" for _ in chars))
