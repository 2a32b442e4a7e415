"""Data sets by name (the real local sets) or by path (the formats users bring), split for training.

Splits are fixed by a seed and disjoint: train, val (model selection and early
stopping) and test (reported once). A test split is never used for selection.

Example:
    >>> splits = load_splits("tuxpaint", task="retrieval")
    >>> len(splits.train), len(splits.val), len(splits.test)
    (500, 85, 200)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graytune.assets import wordnet_nouns
from graytune.data.completions import from_labels, read_completions, reverse_dictionary
from graytune.data.emoji import load_emoji
from graytune.data.files import (
    Record,
    is_coco,
    read_coco,
    read_rows,
    read_shards,
    read_utf8,
    to_classification,
    to_retrieval,
    to_text_classification,
)
from graytune.data.fortunes import load_fortunes
from graytune.data.labeled import (
    LabeledTexts,
    load_fashion_mnist,
    load_image_folder,
    load_wordnet_supersenses,
)
from graytune.data.karpathy import load_karpathy_json
from graytune.data.sketch import load_sketch_folders, load_sketches
from graytune.data.video import load_msrvtt_json
from graytune.data.tuxpaint import load_tuxpaint
from graytune.data.concept import is_concept_folder, load_concept_folder
from graytune.errors import InvalidInputError, UnknownNameError


@dataclass(frozen=True)
class Splits:
    """Disjoint train/val/test sets of one data set, and how to use them."""

    name: str
    task: str  # "retrieval", "classification", "sketch", "generation" or "images" (a concept folder)
    train: Any
    val: Any
    test: Any
    prompt: str = ""  # classification: the class-name prompt, with {} for the name
    fit: str = "crop"  # image preprocessing: crop photos, pad drawings
    classes: tuple[int, ...] | None = None  # classification: the classes trained on (base-to-novel: the base)
    eval_splits: dict[str, tuple[int, ...]] | None = None  # classification: class groups scored apart
    note: str = ""  # how the splits were made when the user did not say (a re-split), shown to the user
    whole: bool = False  # train, val and test are each the whole file (scored whole, never split)


BUILTIN = {"tuxpaint": "retrieval", "emoji": "retrieval", "tuxpaint-sketch": "sketch",
           "fashion-mnist": "classification", "wordnet-supersense": "classification", "fortunes": "classification",
           "wordnet-category": "generation", "fortunes-topic": "generation", "wordnet-reverse": "generation"}
#: the prompts of the built-in language-model sets (classification as generation names the classes)
CATEGORY_PROMPT = "Which of these categories does the definition belong to: {classes}?\nDefinition: {text}\nCategory:"
TOPIC_PROMPT = "Which of these topics is the quote about: {classes}?\nQuote: {text}\nTopic:"
#: the class prompts of classification files: image rows and folders, and text rows (neutral, as fortunes')
IMAGE_PROMPT, TEXT_PROMPT = "a picture of a {}", "a text about {}"
#: a diffusion model's prompt for a folder of images of one concept: each image's caption goes in ``{}``, and the
#: adapter's learned token comes right after it (before the end token), where textual inversion's word would be
CONCEPT_PROMPT = "a picture of {}"
#: how few images a concept folder may have before every split is the whole folder (textual inversion uses 3-5)
WHOLE_BELOW = 10


def _perm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def load_splits(name: str | None, task: str | None = None, seed: int = 0, train_size: int | None = None,
                base_to_novel: bool = False, *, train: str | None = None, val: str | None = None,
                test: str | None = None, whole_if_unsplit: bool = False) -> Splits:
    """The splits of a built-in set (see ``BUILTIN``), of a path, or of explicit split files.

    With ``base_to_novel`` (classification), the first half of the classes is the base: train and
    val keep base samples only; the test split keeps all, scored among base and among novel classes.

    Paths: a ``.csv``/``.jsonl`` of ``image,caption`` (retrieval), ``image,label`` (image
    classification) or ``text,label`` (text classification, for text backbones such as ``minilm``;
    classes are prompted as ``TEXT_PROMPT``, "a text about {}") rows, optionally with a ``split``
    column (train/val/test); a COCO caption ``.json``, a
    Karpathy-split ``.json`` or an MSR-VTT ``.json``; WebDataset ``.tar`` shards (brace patterns such
    as ``shards/{000..009}.tar``); a folder of class folders; a folder with ``sketch/`` and
    ``photo/``. A file without splits is re-split 70/10/20 with ``seed`` (and ``note`` says so).
    ``train``/``val``/``test`` give the splits as separate files instead of ``name``. With
    ``whole_if_unsplit`` (what ``graytune eval`` scores), a file without splits is kept whole instead
    (``whole``: every split is the whole file). Classification classes are the training labels, sorted;
    a val or test file's labels must be among them.
    """
    if train is not None:
        if name is not None:
            raise InvalidInputError("give either --data or --train/--val/--test, not both")
        splits = _explicit(train, val, test, task, seed)
    elif val is not None or test is not None:
        raise InvalidInputError("--val/--test go with --train FILE (the training split)")
    elif name is None:
        raise InvalidInputError("no data: give --data NAME_OR_PATH, or --train FILE (with --val/--test)")
    elif name in BUILTIN:
        splits = _builtin(name, _check_task(name, BUILTIN[name], task), seed, train_size)
    elif name.endswith(":base-to-novel"):
        return load_splits(name.rsplit(":", 1)[0], task, seed, train_size, base_to_novel=True)
    else:
        splits = _from_path(name, task, seed, whole_if_unsplit)
    return _base_to_novel(splits) if base_to_novel else splits


def _check_task(name: str, kind: str, task: str | None) -> str:
    if task is not None and task != kind:
        raise InvalidInputError(f"data {name!r} is for {kind}, not {task!r}; pick --task {kind}")
    return kind


def _looks_like_path(name: str) -> bool:
    return "/" in name or "{" in name or Path(name).suffix.lower() in (".csv", ".jsonl", ".json", ".tar")


def _explicit(train: str, val: str | None, test: str | None, task: str | None, seed: int) -> Splits:
    """Splits from separate files (or folders) of one format; a missing val is carved from train."""
    kind, train_set, extra = _one_source(train, task)
    class_names = getattr(train_set, "class_names", None)
    val_set = _one_source(val, kind, class_names)[1] if val else None
    test_set = _one_source(test, kind, class_names)[1] if test else None
    for flag, other in (("--val", val_set), ("--test", test_set)):
        if other is not None and isinstance(other, LabeledTexts) != isinstance(train_set, LabeledTexts):
            held = ("texts", "images") if isinstance(train_set, LabeledTexts) else ("images", "texts")
            raise InvalidInputError(f"--train {train} holds {held[0]} but {flag} holds {held[1]}; give split files "
                                    "of one kind: all text,label rows or all image rows")
    note = ""
    if val_set is None:
        order = _perm(len(train_set), seed)
        n_val = max(1, len(order) // 10)
        train_set, val_set = train_set.subset(order[n_val:]), train_set.subset(order[:n_val])
        note = f"no --val given: 10 % of --train ({n_val} items, seed {seed}) held out for validation"
    if test_set is None:
        note += ("; " if note else "") + "no --test given: no test metrics"
    extra.pop("karpathy", None)
    return Splits(Path(train).stem, kind, train_set, val_set, test_set, note=note, **extra)


def _one_source(name: str, task: str | None, class_names: Any = None) -> tuple[str, Any, dict[str, Any]]:
    """``(kind, data set, extra Splits fields)`` of one file or folder, whole (no split)."""
    records, kind, extra = _records(name, task)
    if records is None:
        if "karpathy" in extra:
            raise InvalidInputError(f"{name}: a Karpathy .json holds its own splits; give it as --data")
        return kind, extra.pop("data"), extra
    return kind, _data_set(kind, Path(name).stem, records, class_names), extra


def _data_set(kind: str, label: str, records: list[Record], class_names: Any = None) -> Any:
    """The retrieval, image classification or text classification set of ``records``."""
    if kind == "retrieval":
        return to_retrieval(label, records)
    if records and records[0].text is not None:
        return to_text_classification(label, records, class_names)
    return to_classification(label, records, class_names)


def _records(name: str, task: str | None) -> tuple[list[Record] | None, str, dict[str, Any]]:
    """The records of a file (or, for folders and video JSON, ``None`` and the data set in ``extra``)."""
    path = Path(name)
    if ".tar" in name and not path.is_dir():
        records = read_shards(name)
        return records, _kind_of(name, records, task), _prompt(records)
    if not path.exists():
        if _looks_like_path(name):
            raise InvalidInputError(f"no such file or folder: {name}")
        raise UnknownNameError("data set", name, BUILTIN, "or give a path: a .csv/.jsonl, a COCO or Karpathy "
                               ".json, .tar shards or a folder of class folders")
    if path.is_dir():
        if {"sketch", "photo"} <= {p.name for p in path.iterdir()}:
            return None, _check_task(name, "sketch", task), {"data": load_sketch_folders(path), "fit": "pad"}
        if is_concept_folder(path):
            return None, _check_task(name, "images", task), {"data": load_concept_folder(path),
                                                               "prompt": CONCEPT_PROMPT}
        return None, _check_task(name, "classification", task), {"data": load_image_folder(path),
                                                                   "prompt": IMAGE_PROMPT}
    if path.suffix == ".json":
        read_utf8(path)  # text that is not UTF-8 is named (file, line, bytes) before a reader parses it
        if _is_msrvtt(path):
            return None, _check_task(name, "retrieval", task), {"data": load_msrvtt_json(path)}
        if is_coco(path):
            return read_coco(path), _check_task(name, "retrieval", task), {}
        return None, _check_task(name, "retrieval", task), {"karpathy": load_karpathy_json(path)}
    if path.suffix == ".jsonl" and _is_completions(path):
        return None, _check_task(name, "generation", task), {"data": read_completions(path)}
    records = read_rows(path)
    return records, _kind_of(name, records, task), _prompt(records)


def _kind_of(name: str, records: list[Record], task: str | None) -> str:
    kind = "retrieval" if records and records[0].caption is not None else "classification"
    return _check_task(name, kind, task)


def _prompt(records: list[Record]) -> dict[str, Any]:
    """Classification records' class prompt (``TEXT_PROMPT`` for text rows); none for retrieval."""
    if not records or records[0].caption is not None:
        return {}
    return {"prompt": TEXT_PROMPT if records[0].text is not None else IMAGE_PROMPT}


def _generation(name: str, seed: int, train_size: int | None) -> Splits:
    """The built-in language-model sets: (train, val, test) of 2000/200/500 (category), 3000/200/500 (reverse),
    500/100/300 (fortunes topic) prompts, drawn with ``seed``."""
    if name == "wordnet-category":
        data, sizes = from_labels(load_wordnet_supersenses(per_class=550, seed=seed), CATEGORY_PROMPT, name), \
            (2000, 200, 500)
    elif name == "fortunes-topic":
        data, sizes = from_labels(load_fortunes(seed=seed), TOPIC_PROMPT, name), (500, 100, 300)
    else:
        data, sizes = reverse_dictionary(wordnet_nouns(), seed), (3000, 200, 500)
    p = _perm(len(data), seed)
    n_train, n_val, n_test = train_size or sizes[0], sizes[1], sizes[2]
    return Splits(name, "generation", data.subset(p[:n_train]), data.subset(p[n_train:n_train + n_val]),
                  data.subset(p[len(p) - n_test:]))


def _builtin(name: str, kind: str, seed: int, train_size: int | None) -> Splits:
    if kind == "generation":
        return _generation(name, seed, train_size)
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


def _from_path(name: str, task: str | None, seed: int, whole_if_unsplit: bool = False) -> Splits:
    """Splits of one file or folder: its own (a split column, Karpathy's) or 70/10/20 with ``seed``."""
    records, kind, extra = _records(name, task)
    label = Path(name).name if Path(name).is_dir() else Path(name).stem
    if "karpathy" in extra:
        parts = extra["karpathy"]
        return Splits(label, kind, parts["train"], parts["val"], parts["test"])
    if records is not None and any(r.split for r in records):
        return _split_column(name, label, kind, records, extra, seed)
    if kind == "generation" and any(extra["data"].splits):
        return _completion_splits(name, label, extra["data"])
    data = extra.pop("data") if records is None else _data_set(kind, label, records)
    if whole_if_unsplit:
        return _whole(label, kind, data, extra, f"{name} has no splits: scored whole ({len(data)} items); "
                      f"--split test scores the 20 % that graytune train --data {name} holds out for testing")
    if kind == "images" and len(data) < WHOLE_BELOW:
        return _whole(label, kind, data, extra, f"{name} holds {len(data)} images, too few to hold some out: every "
                      "split is the whole folder, so its validation and test scores are training scores")
    if len(data) < 10:
        raise InvalidInputError(f"{name}: needs at least 10 items to split into train/val/test; got {len(data)}")
    note = (f"{name} has no splits: re-split 70/10/20 (train/val/test) with seed {seed}; give a split column "
            "or --train/--val/--test to use your own")
    return _split(label, kind, data, _perm(len(data), seed), note=note, **extra)


def _completion_splits(name: str, label: str, data: Any) -> Splits:
    """A prompt/completion file's own ``split`` field: every row must carry one, each split must be there."""
    if not all(data.splits):
        row = data.splits.index(None) + 1
        raise InvalidInputError(f"{name}: row {row} has no split but others do; give every row a split (train, "
                                "val or test)")
    parts = {}
    for split in ("train", "val", "test"):
        chosen = [i for i, s in enumerate(data.splits) if s == split]
        if not chosen:
            raise InvalidInputError(f"{name}: no row has split {split!r}; give train, val and test rows")
        parts[split] = data.subset(chosen)
    return Splits(label, "generation", parts["train"], parts["val"], parts["test"])


def _split_column(name: str, label: str, kind: str, records: list[Record], extra: dict[str, Any],
                  seed: int = 0) -> Splits:
    """Splits as the file's ``split`` column says; without val rows, 10 % of the train rows are held out for
    validation (with ``seed``, as ``--train`` without ``--val``), and ``note`` says so."""
    blank = next((r for r in records if not r.split), None)
    if blank is not None:
        raise InvalidInputError(f"{blank.origin}: the split column is empty here but set elsewhere; give every "
                                "row a split (train, val or test)")
    rows = {split: [r for r in records if r.split == split] for split in ("train", "val", "test")}
    missing = [split for split in ("train", "test") if not rows[split]]
    if missing:
        raise InvalidInputError(f"{name}: no row has split {missing[0]!r}; give train and test rows (and val "
                                "rows, else 10 % of train is held out for validation)")
    note = ""
    if not rows["val"]:
        order = _perm(len(rows["train"]), seed)
        n_val = max(1, len(order) // 10)
        train = rows["train"]
        rows["val"], rows["train"] = [train[i] for i in order[:n_val]], [train[i] for i in order[n_val:]]
        note = f"{name} has no val rows: 10 % of its train rows ({n_val} items, seed {seed}) held out for validation"
    parts: dict[str, Any] = {}
    for split in ("train", "val", "test"):
        names = getattr(parts.get("train"), "class_names", None)
        parts[split] = _data_set(kind, label, rows[split], names)
    return Splits(label, kind, parts["train"], parts["val"], parts["test"], note=note, **extra)


def _is_completions(path: Path) -> bool:
    """A JSONL whose first row holds ``prompt`` or ``messages``: a language model's data."""
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as fh:
            first = next((line for line in fh if line.strip()), "")
        row = json.loads(first)
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and ("prompt" in row or "messages" in row)


def _is_msrvtt(path: Path) -> bool:
    try:
        return "videos" in json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, json.JSONDecodeError, TypeError):
        return False


def _split(name: str, kind: str, data: Any, order: list[int], **extra: Any) -> Splits:
    """70 / 10 / 20 % train / val / test of any set with ``subset``, in the order ``order``."""
    n = len(order)
    n_test, n_val = max(1, n // 5), max(1, n // 10)
    return Splits(name, kind, data.subset(order[:n - n_test - n_val]), data.subset(order[n - n_test - n_val:n - n_test]),
                  data.subset(order[n - n_test:]), **extra)



def load_whole(name: str, task: str | None = None) -> Splits:
    """A file or folder scored whole (``graytune eval --split all``): every item in the test split.

    Raises:
        InvalidInputError: for built-in sets (they have fixed splits: pick ``test`` or ``val``).
    """
    if name in BUILTIN or name.endswith(":base-to-novel"):
        raise InvalidInputError(f"--split all scores a file of yours whole; {name!r} is a built-in set with fixed "
                                "splits: use --split test or --split val")
    kind, data, extra = _one_source(name, task)
    return _whole(Path(name).stem, kind, data, extra, f"{name} scored whole ({len(data)} items)")


def _whole(label: str, kind: str, data: Any, extra: dict[str, Any], note: str) -> Splits:
    """``data`` as every split: a file scored whole."""
    return Splits(label, kind, data, data, data, note=note, whole=True, **extra)
