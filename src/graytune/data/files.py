"""The files users bring: CSV/JSONL rows, COCO caption JSON, WebDataset tar shards.

Each reader returns ``Record``s (an image, its caption or label, an optional split,
and where it came from: ``pairs.csv row 7``, ``shard-000.tar member 0042.jpg``);
CSV/JSONL rows may instead hold a ``text`` with its ``label`` (text classification).
``to_retrieval`` / ``to_classification`` / ``to_text_classification`` make the data
sets the tasks train on. Images are never decoded here: only their names (or tar
offsets) are kept, so memory does not grow with the images' size.

Example:
    >>> records = read_rows(Path("pairs.csv"))   # image,caption / image,label / text,label, each [,split]
    >>> data = to_retrieval("pairs", records)
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from graytune.artifact_files import file_sha256
from graytune.data.labeled import IMAGE_SUFFIXES, LabeledImageFiles, LabeledTexts
from graytune.data.tuxpaint import ImageCaptionSet
from graytune.errors import InvalidInputError, MissingDependencyError

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}


@dataclass(frozen=True)
class TarMember:
    """One file inside a tar shard, read by offset (no whole-shard read)."""

    shard: str
    name: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as fh:
            fh.seek(self.offset)
            return fh.read(self.size)

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


@dataclass(frozen=True)
class Record:
    """One item of a user's file: an image with its caption or label, or a text with its label."""

    image: Path | TarMember | None  # None for a text row
    caption: str | None
    label: str | None
    split: str | None
    origin: str  # where it was listed: ``pairs.csv row 7``
    text: str | None = None  # a text row's text (text classification)


def read_rows(path: Path) -> list[Record]:
    """The rows of a CSV (with a header) or JSONL file, each with an optional ``split`` (train/val/test).

    A file holds one kind of row: ``image,caption`` (retrieval), ``image,label`` (image classification)
    or ``text,label`` (text classification); image names are relative to the file's folder.

    Example:
        >>> [r.text for r in read_rows(Path("reviews.csv"))]  # rows: text,label / "Loved it",positive
        ['Loved it']

    Raises:
        InvalidInputError: a missing file, another suffix, a CSV header without the columns of one kind,
            a row that is not JSON, a row with both or neither of ``image`` and ``text``, a text row with an
            empty text or label, or image rows and text rows in one file, each naming the file and row.
    """
    if not path.is_file():
        raise InvalidInputError(f"no such file: {path}")
    rows: list[tuple[dict, str]] = []
    if path.suffix == ".jsonl":
        for n, line in enumerate(read_utf8(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"{path} line {n} is not valid JSON ({err.msg} at column {err.colno}); "
                                        "each line must be one object such as "
                                        '{"image": "a.jpg", "caption": "a cat"} or '
                                        '{"text": "Loved it", "label": "positive"}') from None
            if not isinstance(item, dict):
                raise InvalidInputError(f"{path} line {n}: expected a JSON object, got {type(item).__name__}")
            rows.append((item, f"{path.name} line {n}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_utf8(path, "row"), newline=""))
        rows = [(r, f"{path.name} row {n}") for n, r in enumerate(reader, 2)]  # row 1 is the header
        fields = set(reader.fieldnames or [])
        if not ("image" in fields and {"caption", "label"} & fields or {"text", "label"} <= fields):
            raise InvalidInputError(f"{path}: needs a header with 'image' and 'caption' (retrieval), 'image' and "
                                    "'label' (image classification) or 'text' and 'label' (text classification), "
                                    f"optionally 'split'; got {reader.fieldnames or []}")
    else:
        raise InvalidInputError(f"{path}: expected a .csv or .jsonl of image,caption, image,label or text,label "
                                "rows, a COCO or Karpathy caption .json, or WebDataset .tar shards")
    return _one_kind(path, [_record(path, item, origin) for item, origin in rows])


def _one_kind(path: Path, records: list[Record]) -> list[Record]:
    """``records``, refused when image rows and text rows are mixed (a data set holds one kind of query)."""
    odd = next((r for r in records if (r.text is None) != (records[0].text is None)), None)
    if odd is not None:
        kinds = ("an image row", "a text row") if odd.text is None else ("a text row", "an image row")
        raise InvalidInputError(f"{odd.origin} of {path} is {kinds[0]} but its first row ({records[0].origin}) is "
                                f"{kinds[1]}; a file holds image rows or text rows, not both: put them in separate "
                                "files")
    return records


def read_utf8(path: Path, unit: str = "line") -> str:
    """``path``'s text, read as UTF-8 with or without a byte-order mark (Excel's "CSV UTF-8" writes one).

    Raises:
        InvalidInputError: bytes that are not UTF-8, naming the file, the line (``unit="row"``: the CSV row)
            and the bytes around them.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        start = err.start
        prefix = raw[:start].decode("utf-8-sig")
        if unit == "row":  # a CSV row may span lines inside quotes: count the rows csv reads before the byte
            number = len(list(csv.reader(io.StringIO(prefix, newline=""))))
            number += 1 if not prefix or prefix.endswith(("\n", "\r")) else 0
        else:
            number = prefix.count("\n") + 1
        raise InvalidInputError(f"{path} {unit} {number} is not UTF-8 ({_bad_byte(raw, start)}); graytune reads "
                                "UTF-8 text (a byte-order mark is fine): save the file as UTF-8, e.g. Excel's "
                                "'CSV UTF-8' or iconv -f latin1 -t utf-8") from None


def _bad_byte(raw: bytes, start: int) -> str:
    """``byte 0xe9 near 'a caf?'``: the first byte that is not UTF-8 and its line's text around it."""
    begin = max(raw.rfind(b"\n", 0, start) + 1, start - 24)
    end = min(len(raw) if (stop := raw.find(b"\n", start)) < 0 else stop, start + 8)
    return f"byte {raw[start]:#x} near {raw[begin:end].decode('utf-8', 'replace')!r}"


ROW_KINDS = "'image' with 'caption' or 'label', or 'text' with 'label'"


def _record(path: Path, item: dict, origin: str) -> Record:
    """One row as a ``Record``: an image row, or a text row (``text`` and ``label``, no image)."""
    has_image, has_text = _text(item.get("image")) is not None, _text(item.get("text")) is not None
    if has_image and has_text:
        raise InvalidInputError(f"{origin} of {path} has both an image and a text ({_shown(item)}); each row "
                                f"needs {ROW_KINDS}: put image rows and text rows in separate files")
    if has_text or "text" in item and "image" not in item:
        return _text_record(path, item, origin)
    if not has_image or not ({"caption", "label"} & set(item)):
        raise InvalidInputError(f"{origin} of {path}: each row needs {ROW_KINDS}; got {_shown(item)}")
    return Record(path.parent / str(item["image"]), _text(item.get("caption")), _text(item.get("label")),
                  split_name(item.get("split"), origin), origin)


def _text_record(path: Path, item: dict, origin: str) -> Record:
    """A text classification row: a text that is not blank and its label."""
    text, label = _text(item.get("text")), _text(item.get("label"))
    problem = ("its text is empty" if text is None or not text.strip() else
               "its label is empty" if label is None or not label.strip() else
               "it has a caption" if _text(item.get("caption")) is not None else "")
    if problem:
        raise InvalidInputError(f"{origin} of {path}: {problem} ({_shown(item)}); a text row needs a text and "
                                "its class in 'label' (text,label: text classification; captions go with images)")
    return Record(None, None, label, split_name(item.get("split"), origin), origin, text=text)


def _shown(item: dict) -> str:
    """A row as the user wrote it, for errors: ``{'text': '', 'label': 'sports'}`` (long values cut)."""
    cut = {k: v[:40] + "…" if isinstance(v, str) and len(v) > 40 else v for k, v in item.items()}
    return repr(cut)


def _text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def split_name(value: object, origin: str) -> str | None:
    """``train``/``val``/``test`` from a split column's value (``validation``, ``dev`` … accepted)."""
    if value is None or value == "":
        return None
    name = SPLIT_NAMES.get(str(value).strip().lower())
    if name is None:
        raise InvalidInputError(f"{origin}: split {value!r} is not one of train, val, test (or validation, dev)")
    return name


def is_coco(path: Path) -> bool:
    """A COCO caption file: ``images`` and ``annotations`` lists (the official layout)."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):  # a UnicodeDecodeError too: read_coco names the line
        return False
    return isinstance(data, dict) and isinstance(data.get("images"), list) and isinstance(
        data.get("annotations"), list)


def read_coco(path: Path) -> list[Record]:
    """Caption records of a COCO ``captions_*.json``; images are looked for beside the file and in the
    folder named after it (``captions_val2017.json`` → ``val2017/``, also one level up)."""
    data = json.loads(read_utf8(path))
    images = {img["id"]: img["file_name"] for img in data["images"]}
    stem = path.stem.split("_", 1)[-1]  # captions_val2017 -> val2017
    roots = [path.parent, path.parent / stem, path.parent.parent / stem, path.parent.parent]
    found: dict[int, Path] = {}
    for image_id, name in images.items():
        where = next((r / name for r in roots if (r / name).is_file()), None)
        if where is None:
            raise InvalidInputError(f"{path}: image {name} (id {image_id}) is in none of "
                                    f"{', '.join(str(r) for r in roots)}; put the images in one of them")
        found[image_id] = where
    records = []
    for n, ann in enumerate(data["annotations"]):
        if ann.get("image_id") not in found:
            raise InvalidInputError(f"{path}: annotation {n} names image_id {ann.get('image_id')!r}, which is not "
                                    "among its images")
        records.append(Record(found[ann["image_id"]], str(ann["caption"]).strip(), None, None,
                              f"{path.name} annotation {ann.get('id', n)}"))
    return records


def read_shards(pattern: str) -> list[Record]:
    """Records of WebDataset tar shards (``data/shard-{000..009}.tar``): per sample key an image and a
    caption (``.txt``/``.caption``/``.json`` with ``caption``) or a label (``.cls``/``.label``/``.json``)."""
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import base_plus_ext

    records: list[Record] = []
    for shard in expand_urls(pattern):
        if not Path(shard).is_file():
            raise InvalidInputError(f"no such file: {shard} (from the shard pattern {pattern})")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            with tarfile.open(shard) as tar:
                for info in tar:
                    key, ext = base_plus_ext(info.name)
                    if info.isfile() and key is not None:
                        samples.setdefault(key, {})[ext.lower()] = info
                records += [_shard_record(shard, key, parts, tar) for key, parts in samples.items()]
        except tarfile.TarError as err:
            raise InvalidInputError(f"{shard} is not a readable tar shard ({err})") from None
    if not records:
        raise InvalidInputError(f"{pattern}: no samples in the shards")
    return records


def _shard_record(shard: str, key: str, parts: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> Record:
    origin = f"{Path(shard).name} sample {key}"
    image_ext = next((e for e in parts if "." + e.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
    if image_ext is None:
        raise InvalidInputError(f"{origin}: no image member (.jpg, .png, …) among {sorted(parts)}")

    def text(ext: str) -> str | None:
        info = parts.get(ext)
        if info is None:
            return None
        handle = tar.extractfile(info)
        if handle is None:
            return None
        raw = handle.read()
        try:
            return raw.decode("utf-8-sig").strip()
        except UnicodeDecodeError as err:
            raise InvalidInputError(f"{shard} member {info.name} is not UTF-8 ({_bad_byte(raw, err.start)}); "
                                    "graytune reads UTF-8 text: write the shard's text files as UTF-8") from None

    meta = json.loads(text("json") or "{}")
    caption = text("txt") or text("caption") or meta.get("caption")
    label = text("cls") or text("label") or meta.get("label")
    if caption is None and label is None:
        raise InvalidInputError(f"{origin}: needs a caption (.txt, .caption or json 'caption') or a label "
                                "(.cls, .label or json 'label')")
    info = parts[image_ext]
    member = TarMember(shard, info.name, info.offset_data, info.size)
    return Record(member, caption, None if label is None else str(label), split_name(meta.get("split"), origin),
                  origin)


def to_retrieval(name: str, records: Sequence[Record]) -> ImageCaptionSet:
    """Images with their captions (several captions of one image stay together)."""
    missing = [r for r in records if r.caption is None]
    if missing:
        raise InvalidInputError(f"{missing[0].origin}: no caption; retrieval needs a caption on every row "
                                "(rows with labels make a classification set)")
    _check_files(records)
    index: dict[object, int] = {}
    images, origins = [], []
    for r in records:
        if r.image not in index:
            index[r.image] = len(images)
            images.append(r.image)
            origins.append(r.origin)
    return ImageCaptionSet(name, tuple(images), tuple(r.caption for r in records),  # type: ignore[misc]
                           tuple(index[r.image] for r in records), tuple("" for _ in images), tuple(origins))


def to_classification(name: str, records: Sequence[Record], class_names: Sequence[str] | None = None,
                      ) -> LabeledImageFiles:
    """Images with labels; the class list is the sorted label names unless given (a val or test file's
    labels must be among the training file's ``class_names``)."""
    texts = next((r for r in records if r.image is None), None)
    if texts is not None:
        raise InvalidInputError(f"{texts.origin}: a text row; to_text_classification makes a set of text rows")
    _check_files(records)
    names, labels = _class_labels(name, records, class_names, ", or give captions for retrieval")
    return LabeledImageFiles(name, tuple(r.image for r in records),  # type: ignore[misc]
                             labels, names, tuple(r.origin for r in records))


def to_text_classification(name: str, records: Sequence[Record], class_names: Sequence[str] | None = None,
                           ) -> LabeledTexts:
    """Texts with labels (``text,label`` rows), classes as ``to_classification`` orders them: sorted unless given.

    Example:
        >>> data = to_text_classification("reviews", read_rows(Path("reviews.csv")))
        >>> data.texts[0], data.class_names
        ('Loved it', ('negative', 'positive'))
    """
    images = next((r for r in records if r.text is None), None)
    if images is not None:
        raise InvalidInputError(f"{images.origin}: an image row; to_classification makes a set of image rows")
    names, labels = _class_labels(name, records, class_names, "")
    return LabeledTexts(name, tuple(str(r.text) for r in records), labels, names)


def _class_labels(name: str, records: Sequence[Record], class_names: Sequence[str] | None, other: str,
                  ) -> tuple[tuple[str, ...], torch.Tensor]:
    """The class names (sorted labels unless given) and each record's class index ``[N]``; ``other``: what else
    a one-class file could do, ended on the error."""
    missing = [r for r in records if r.label is None]
    if missing:
        raise InvalidInputError(f"{missing[0].origin}: no label; classification needs a label on every row")
    names = tuple(class_names) if class_names is not None else tuple(sorted({str(r.label) for r in records}))
    if len(names) == 1:
        raise InvalidInputError(f"{name}: every row has the label {names[0]!r}; classification needs at least 2 "
                                "classes (with one, every answer is right and accuracy is 100 % whatever the "
                                f"model learns): add rows of other classes{other}")
    position = {c: i for i, c in enumerate(names)}
    unknown = sorted({str(r.label) for r in records} - set(names))
    if unknown:
        first = next(r for r in records if str(r.label) not in position)
        raise InvalidInputError(f"labels {unknown[:5]} (first at {first.origin}) are not among the training "
                                f"classes {list(names)[:10]}; a val or test file may only use the training file's "
                                "labels: fix or drop those rows, or add training rows of those classes")
    return names, torch.tensor([position[str(r.label)] for r in records])


def _check_files(records: Sequence[Record]) -> None:
    missing = [r for r in records if isinstance(r.image, Path) and not r.image.is_file()]
    if missing:
        raise MissingDependencyError(f"{len(missing)} image files are missing, e.g. {missing[0].image} "
                                     f"({missing[0].origin})")


def content_sha256(source: str) -> str:
    """SHA-256 of what a run reads from ``source`` (what a resume checks): a file's bytes, each shard's bytes in
    order for a shard pattern, or for a folder its listing (relative names and sizes; images are not read)."""
    digest, path = hashlib.sha256(), Path(source)
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\t{file.stat().st_size}\n".encode())
        return digest.hexdigest()
    if ".tar" in source:
        from webdataset.shardlists import expand_urls

        parts = [Path(p) for p in expand_urls(source)]
    else:
        parts = [path]
    for part in parts:
        digest.update(file_sha256(part).encode())
    return digest.hexdigest()


def open_image_source(item: Path | str | TarMember) -> Path | str | io.BytesIO:
    """What ``PIL.Image.open`` takes for a data set's image item (a path, or a tar member's bytes)."""
    return io.BytesIO(item.read_bytes()) if isinstance(item, TarMember) else item
