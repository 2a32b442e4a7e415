"""A folder of images that shows one concept or style (what textual inversion and DreamBooth train on), for
diffusion models: ``root/<image>``, no class sub-folders; a caption beside an image in ``<image stem>.txt`` (UTF-8,
one line) is used where there is one, as LoRA trainers read theirs.

Example:
    >>> data = load_concept_folder("my-cat/")      # my-cat/1.png, my-cat/1.txt ("on a sofa"), my-cat/2.png
    >>> data.captions
    ('on a sofa', '')
"""

from __future__ import annotations

from pathlib import Path

from graytune.data.labeled import IMAGE_SUFFIXES
from graytune.data.tuxpaint import ImageCaptionSet
from graytune.errors import InvalidInputError

#: a caption file's most characters (a prompt is cut at 77 tokens anyway)
MAX_CAPTION_CHARS = 2000


def is_concept_folder(root: Path) -> bool:
    """Whether ``root`` holds images itself and no sub-folders (a class folder tree has sub-folders); hidden entries
    (``.ipynb_checkpoints``, ``.DS_Store``) do not count."""
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    return not any(p.is_dir() for p in entries) and any(p.suffix.lower() in IMAGE_SUFFIXES for p in entries)


def load_concept_folder(root: str | Path) -> ImageCaptionSet:
    """The images of ``root`` in name order, each with its ``.txt`` caption or the empty caption."""
    root = Path(root)
    images = sorted(p for p in root.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise InvalidInputError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
    captions = [_caption(p.with_suffix(".txt")) for p in images]
    return ImageCaptionSet(root.name, tuple(images), tuple(captions), tuple(range(len(images))),
                           tuple("" for _ in images), tuple(f"{p.name}" for p in images))


def _caption(path: Path) -> str:
    if not path.is_file():
        return ""
    size = path.stat().st_size  # before reading: a huge file is refused unread
    if size > MAX_CAPTION_CHARS * 4:
        raise InvalidInputError(f"{path}: a caption file of {size:,} bytes; captions are one line of at most "
                                f"{MAX_CAPTION_CHARS} characters: shorten it")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(f"{path}: not UTF-8 (byte {err.start}); save the caption as UTF-8") from None
    return " ".join(text.split())[:MAX_CAPTION_CHARS]
