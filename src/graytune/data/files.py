"""The files users bring: CSV/JSONL rows, COCO caption JSON, WebDataset tar shards.

Each reader returns ``Record``s (an image, its caption or label, an optional split,
and where it came from: ``pairs.csv row 7``, ``shard-000.tar member 0042.jpg``);
``to_retrieval`` / ``to_classification`` make the data sets the tasks train on.
Images are never decoded here: only their names (or tar offsets) are kept, so
memory does not grow with the images' size.

Example:
    >>> records = read_rows(Path("pairs.csv"))           # image,caption[,split] or image,label[,split]
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
from graytune.data.labeled import IMAGE_SUFFIXES, LabeledImageFiles
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
    image: Path | TarMember
    caption: str | None
    label: str | None
    split: str | None
    origin: str


def read_rows(path: Path) -> list[Record]:
    """``image,caption`` or ``image,label`` rows of a CSV or JSONL file, with an optional ``split`` column."""
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
                                        '{"image": "a.jpg", "caption": "a cat"}') from None
            if not isinstance(item, dict):
                raise InvalidInputError(f"{path} line {n}: expected a JSON object, got {type(item).__name__}")
            rows.append((item, f"{path.name} line {n}"))
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_utf8(path, "row"), newline=""))
        rows = [(r, f"{path.name} row {n}") for n, r in enumerate(reader, 2)]  # row 1 is the header
        fields = reader.fieldnames or []
        if "image" not in fields or not {"caption", "label"} & set(fields):
            raise InvalidInputError(f"{path}: needs a header with 'image' and 'caption' (retrieval) or 'label' "
                                    f"(classification), optionally 'split'; got {fields}")
    else:
        raise InvalidInputError(f"{path}: expected a .csv or .jsonl of image,caption or image,label rows, a COCO "
                                "or Karpathy caption .json, or WebDataset .tar shards")
    return [_record(path, item, origin) for item, origin in rows]


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


def _record(path: Path, item: dict, origin: str) -> Record:
    if "image" not in item or not ({"caption", "label"} & set(item)):
        raise InvalidInputError(f"{origin} of {path}: each row needs 'image' and 'caption' or 'label'; "
                                f"got {sorted(item)}")
    return Record(path.parent / str(item["image"]), _text(item.get("caption")), _text(item.get("label")),
                  split_name(item.get("split"), origin), origin)


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
    """Images with labels; the class list is the sorted label names unless given."""
    missing = [r for r in records if r.label is None]
    if missing:
        raise InvalidInputError(f"{missing[0].origin}: no label; classification needs a label on every row")
    _check_files(records)
    names = tuple(class_names) if class_names is not None else tuple(sorted({str(r.label) for r in records}))
    if len(names) == 1:
        raise InvalidInputError(f"{name}: every row has the label {names[0]!r}; classification needs at least 2 "
                                "classes (with one, every answer is right and accuracy is 100 % whatever the "
                                "model learns): add rows of other classes, or give captions for retrieval")
    position = {c: i for i, c in enumerate(names)}
    unknown = sorted({str(r.label) for r in records} - set(names))
    if unknown:
        raise InvalidInputError(f"labels {unknown[:5]} are not among the training classes {list(names)[:10]}")
    return LabeledImageFiles(name, tuple(r.image for r in records),  # type: ignore[misc]
                             torch.tensor([position[str(r.label)] for r in records]), names,
                             tuple(r.origin for r in records))


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
