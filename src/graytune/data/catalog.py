"""Data sets by name (the real local sets) or by path (the formats users bring), split for training.

Splits are fixed by a seed and disjoint: train, val (model selection and early
stopping) and test (reported once). A test split is never used for selection.

Example:
    >>> splits = load_splits("tuxpaint", task="retrieval")
    >>> len(splits.train), len(splits.val), len(splits.test)
    (500, 85, 200)
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graytune.data.emoji import load_emoji
from graytune.data.fortunes import load_fortunes
from graytune.data.labeled import (
    LabeledImages,
    LabeledTexts,
    load_fashion_mnist,
    load_image_folder,
    load_wordnet_supersenses,
)
from graytune.data.karpathy import load_karpathy_json
from graytune.data.sketch import load_sketch_folders, load_sketches
from graytune.data.video import load_msrvtt_json
from graytune.data.tuxpaint import ImageCaptionSet, load_tuxpaint
from graytune.errors import InvalidInputError, MissingDependencyError, UnknownNameError


@dataclass(frozen=True)
class Splits:
    """Disjoint train/val/test sets of one data set, and how to use them."""

    name: str
    task: str  # "retrieval" or "classification"
    train: Any
    val: Any
    test: Any
    prompt: str = ""  # classification: the class-name prompt, with {} for the name
    fit: str = "crop"  # image preprocessing: crop photos, pad drawings
    classes: tuple[int, ...] | None = None  # classification: the classes trained on (base-to-novel: the base)
    eval_splits: dict[str, tuple[int, ...]] | None = None  # classification: class groups scored apart


BUILTIN = {"tuxpaint": "retrieval", "emoji": "retrieval", "tuxpaint-sketch": "sketch",
           "fashion-mnist": "classification", "wordnet-supersense": "classification", "fortunes": "classification"}


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def load_splits(name: str, task: str | None = None, seed: int = 0, train_size: int | None = None,
                base_to_novel: bool = False) -> Splits:
    """The splits of a built-in set (see ``BUILTIN``) or of a path.

    With ``base_to_novel`` (classification), the first half of the classes is the base: train and
    val keep base samples only; the test split keeps all, scored among base and among novel classes.

    Paths: a ``.csv``/``.jsonl`` of ``image,caption`` rows (retrieval, image paths relative to the file)
    or a folder of class sub-folders of images (classification).
    """
    if name in BUILTIN:
        kind = BUILTIN[name]
    elif name.endswith(":base-to-novel"):
        return load_splits(name.rsplit(":", 1)[0], task, seed, train_size, base_to_novel=True)
    elif Path(name).exists():
        kind = "classification" if Path(name).is_dir() else "retrieval"
        if Path(name).is_dir() and {"sketch", "photo"} <= {p.name for p in Path(name).iterdir()}:
            kind = "sketch"
    else:
        raise UnknownNameError("data set", name, BUILTIN,
                               "or give a path: a .csv/.jsonl of image,caption or a folder of class folders")
    if task is not None and task != kind:
        raise InvalidInputError(f"data {name!r} is for {kind}, not {task!r}; pick --task {kind}")
    splits = _builtin(name, kind, seed, train_size) if name in BUILTIN else _from_path(Path(name), kind, seed)
    return _base_to_novel(splits) if base_to_novel else splits


def _builtin(name: str, kind: str, seed: int, train_size: int | None) -> Splits:
    if name == "tuxpaint":
        data = load_tuxpaint()
        p = _perm(len(data), seed)
        n_train = train_size or 500
        return Splits(name, kind, data.subset(p[:n_train]), data.subset(p[n_train:585]), data.subset(p[585:]),
                      fit="pad")
    if name == "fashion-mnist":
        full, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        p = _perm(len(full), seed)
        n_train = train_size or 1000
        return Splits(name, kind, full.subset(p[:n_train]), full.subset(p[n_train:n_train + 500]),
                      test.subset(_perm(len(test), seed)[:1000]), prompt="a picture of a {}")
    if name == "wordnet-supersense":
        data = load_wordnet_supersenses(per_class=550, seed=seed)
        p = _perm(len(data), seed)
        n_train = train_size or 2000
        return Splits(name, kind, data.subset(p[:n_train]), data.subset(p[n_train:n_train + 500]),
                      data.subset(p[-3000:]), prompt="this is a definition of a kind of {}")
    if name == "fortunes":
        data = load_fortunes(seed=seed)
        p = _perm(len(data), seed)
        return Splits(name, kind, data.subset(p[:train_size or 500]), data.subset(p[500:700]),
                      data.subset(p[700:]), prompt="a quote about {}")
    if name == "emoji":
        data = load_emoji()
        p = _perm(len(data), seed)
        return Splits(name, kind, data.subset(p[:train_size or 873]), data.subset(p[873:973]),
                      data.subset(p[973:]))
    sketches = load_sketches()
    p = _perm(len(sketches), seed)
    return Splits(name, kind, sketches.subset(p[:train_size or 500]), sketches.subset(p[500:585]),
                  sketches.subset(p[585:]), fit="pad")


def _base_to_novel(splits: Splits) -> Splits:
    if splits.task != "classification":
        raise InvalidInputError(f"base-to-novel needs a classification set; {splits.name} is for {splits.task}")
    n = len(splits.train.class_names)
    base, novel = tuple(range(n // 2)), tuple(range(n // 2, n))

    def keep(data):  # type: ignore[no-untyped-def]
        return data.subset([i for i, y in enumerate(data.labels.tolist()) if y in base])

    return replace(splits, name=f"{splits.name}:base-to-novel", train=keep(splits.train), val=keep(splits.val),
                   classes=base, eval_splits={"base": base, "novel": novel})


def _from_path(path: Path, kind: str, seed: int) -> Splits:
    if kind == "retrieval" and path.suffix == ".json":
        if _is_msrvtt(path):
            data = load_msrvtt_json(path)
            return _split(path.stem, kind, data, _perm(len(data), seed))
        parts = load_karpathy_json(path)
        return Splits(path.stem, kind, parts["train"], parts["val"], parts["test"])
    if kind == "sketch":
        pairs = load_sketch_folders(path)
        return _split(path.name, kind, pairs, _perm(len(pairs), seed), fit="pad")
    if kind == "retrieval":
        rows = _read_pairs(path)
        images = sorted({r[0] for r in rows})
        index = {img: i for i, img in enumerate(images)}
        data = ImageCaptionSet(path.stem, tuple(images), tuple(r[1] for r in rows),
                               tuple(index[r[0]] for r in rows), tuple("" for _ in images))
        return _split(path.stem, kind, data, _perm(len(images), seed))
    folder = load_image_folder(path)
    return _split(path.name, kind, folder, _perm(len(folder), seed), prompt="a picture of a {}")


def _is_msrvtt(path: Path) -> bool:
    try:
        return "videos" in json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def _read_pairs(path: Path) -> list[tuple[Path, str]]:
    rows: list[tuple[Path, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                item = json.loads(line)
                if "image" not in item or "caption" not in item:
                    raise InvalidInputError(f"{path}:{n}: each line needs 'image' and 'caption'; got {sorted(item)}")
                rows.append((path.parent / item["image"], str(item["caption"])))
    elif path.suffix == ".csv":
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise InvalidInputError(f"{path}: needs a header with 'image' and 'caption'; got {reader.fieldnames}")
            rows = [(path.parent / r["image"], r["caption"]) for r in reader]
    else:
        raise InvalidInputError(f"{path}: expected a .csv or .jsonl of image,caption pairs, a Karpathy-split "
                                ".json or an MSR-VTT-style .json")
    missing = [str(p) for p, _ in rows if not p.is_file()]
    if missing:
        raise MissingDependencyError(f"{path}: {len(missing)} image files are missing, e.g. {missing[0]}")
    if len({p for p, _ in rows}) < 10:
        raise InvalidInputError(f"{path}: needs at least 10 images to split into train/val/test")
    return rows


def _split(name: str, kind: str, data: Any, order: list[int], **extra: Any) -> Splits:
    """70 / 10 / 20 % train / val / test of any set with ``subset``, in the order ``order``."""
    n = len(order)
    n_test, n_val = max(1, n // 5), max(1, n // 10)
    return Splits(name, kind, data.subset(order[:n - n_test - n_val]), data.subset(order[n - n_test - n_val:n - n_test]),
                  data.subset(order[n - n_test:]), **extra)

