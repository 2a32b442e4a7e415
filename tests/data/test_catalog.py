"""Built-in data sets and the formats users bring, split disjointly."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from PIL import Image

from graytune import InvalidInputError, MissingDependencyError, UnknownNameError
from graytune.data.catalog import load_splits
from graytune.data.labeled import load_fashion_mnist, load_wordnet_supersenses, read_idx


def test_tuxpaint_splits_are_disjoint_and_fixed() -> None:
    s = load_splits("tuxpaint")
    names = [set(map(str, part.images)) for part in (s.train, s.val, s.test)]
    assert [len(n) for n in names] == [500, 85, 200]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert [str(p) for p in load_splits("tuxpaint").test.images] == [str(p) for p in s.test.images]
    assert s.fit == "pad"


def test_fashion_mnist_is_the_real_set() -> None:
    train = load_fashion_mnist("train")
    assert train.images.shape == (60000, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    s = load_splits("fashion-mnist")
    assert (len(s.train), len(s.val), len(s.test)) == (1000, 500, 1000)


def test_wordnet_supersenses_are_balanced() -> None:
    data = load_wordnet_supersenses(per_class=50)
    assert data.labels.bincount().tolist() == [50] * 10 and "animal" in data.class_names


def test_idx_reader_checks_its_input(tmp_path) -> None:
    good = tmp_path / "x.idx.gz"
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    good.write_bytes(gzip.compress(bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in arr.shape)
                                   + arr.tobytes()))
    assert (read_idx(good) == arr).all()
    bad = tmp_path / "bad.idx"
    bad.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(InvalidInputError, match="truncated"):
        read_idx(bad)


def write_pairs(folder, n: int = 12, fmt: str = "csv"):  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", (40, 30), (20 * i % 255, 100, 200)).save(folder / f"im{i}.png")
        rows.append((f"im{i}.png", f"a picture number {i}"))
    if fmt == "csv":
        (folder / "pairs.csv").write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
        return folder / "pairs.csv"
    import json

    (folder / "pairs.jsonl").write_text("".join(json.dumps({"image": a, "caption": b}) + "\n" for a, b in rows))
    return folder / "pairs.jsonl"


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_caption_files_load_and_split(tmp_path, fmt: str) -> None:
    s = load_splits(str(write_pairs(tmp_path / fmt, fmt=fmt)))
    assert s.task == "retrieval" and len(s.train) + len(s.val) + len(s.test) == 12


def test_bad_data_names_and_files(tmp_path) -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'tuxpaint'"):
        load_splits("tuxpain")
    with pytest.raises(InvalidInputError, match="pick --task classification"):
        load_splits("fashion-mnist", task="retrieval")
    path = write_pairs(tmp_path / "p")
    (tmp_path / "p" / "im3.png").unlink()
    with pytest.raises(MissingDependencyError, match="1 image files are missing"):
        load_splits(str(path))
    (tmp_path / "h.csv").write_text("img,text\nx,y\n")
    with pytest.raises(InvalidInputError, match="needs a header with 'image' and 'caption'"):
        load_splits(str(tmp_path / "h.csv"))
