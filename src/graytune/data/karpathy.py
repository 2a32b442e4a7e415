"""COCO / Flickr30k captions in the Karpathy-split JSON that retrieval papers use.

``{"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}]}]}``;
``restval`` counts as train. Image paths are ``<root>/<filepath>/<filename>``.

Example:
    >>> parts = load_karpathy_json("dataset_flickr30k.json", image_root="flickr30k-images")
    >>> parts["test"].captions[:5]
"""

from __future__ import annotations

import json
from pathlib import Path

from graytune.data.tuxpaint import ImageCaptionSet
from graytune.errors import InvalidInputError, MissingDependencyError


def load_karpathy_json(path: str | Path, image_root: str | Path | None = None) -> dict[str, ImageCaptionSet]:
    """``{"train", "val", "test"}`` sets; several captions per image kept."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    try:
        images = json.loads(path.read_text())["images"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise InvalidInputError(f"{path}: not a Karpathy-split JSON ({err!r}); expected "
                                '{"images": [{"filename", "split", "sentences": [{"raw"}]}]}') from err
    parts: dict[str, tuple[list[Path], list[str], list[int]]] = {k: ([], [], []) for k in ("train", "val", "test")}
    for item in images:
        split = "train" if item.get("split") == "restval" else item.get("split")
        if split not in parts:
            continue
        files, captions, index = parts[split]
        files.append(root / item.get("filepath", "") / item["filename"])
        for sentence in item["sentences"]:
            captions.append(sentence["raw"].strip())
            index.append(len(files) - 1)
    missing = [str(f) for files, _, _ in parts.values() for f in files if not f.is_file()]
    if missing:
        raise MissingDependencyError(f"{path}: {len(missing)} images are missing under {root}, e.g. {missing[0]}; "
                                     "pass the folder holding them as image_root")
    return {k: ImageCaptionSet(f"{path.stem}-{k}", tuple(f), tuple(c), tuple(i), tuple("" for _ in f))
            for k, (f, c, i) in parts.items()}
