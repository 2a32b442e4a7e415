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


def test_emoji_fortunes_and_sketches_are_real_local_sets() -> None:
    emoji = load_splits("emoji")
    assert (len(emoji.train), len(emoji.val), len(emoji.test)) == (873, 100, 400)
    assert "hammer" in emoji.train.captions + emoji.val.captions + emoji.test.captions
    fortunes = load_splits("fortunes")
    assert fortunes.train.class_names[0] == "computers" and len(fortunes.test) > 500
    sketch = load_splits("tuxpaint-sketch")
    assert sketch.task == "sketch" and len(sketch.train) == 500
    edges = np.asarray(sketch.train.sketches[0].convert("L"))
    assert edges.min() == 0 and (edges == 255).mean() > 0.5  # dark lines on a mostly white page


def test_base_to_novel_trains_on_base_classes_only() -> None:
    s = load_splits("fashion-mnist:base-to-novel")
    assert s.classes == (0, 1, 2, 3, 4) and s.eval_splits == {"base": (0, 1, 2, 3, 4), "novel": (5, 6, 7, 8, 9)}
    assert int(s.train.labels.max()) <= 4 and int(s.val.labels.max()) <= 4
    assert set(s.test.labels.tolist()) == set(range(10))
    with pytest.raises(InvalidInputError, match="needs a classification set"):
        load_splits("tuxpaint", base_to_novel=True)


def test_image_folder_classification(tmp_path) -> None:
    for c, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.new("RGB", (16, 16), colour).save(tmp_path / "imgs" / c / f"{i}.png")
    s = load_splits(str(tmp_path / "imgs"))
    assert s.task == "classification" and s.train.class_names == ("blue", "red")
    assert len(s.train) + len(s.val) + len(s.test) == 20
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "flat" / "x.png")
    flat = load_splits(str(tmp_path / "flat"))  # images of one concept (diffusion models), too few to split
    assert flat.task == "images" and flat.whole and len(flat.train) == 1
    with pytest.raises(InvalidInputError, match="is for images, not 'classification'"):
        load_splits(str(tmp_path / "flat"), task="classification")
    (tmp_path / "one" / "red").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "one" / "red" / "x.png")
    with pytest.raises(InvalidInputError, match="at least 2 class sub-folders .* or, for a diffusion model, images "
                                                "of one concept in the folder itself"):
        load_splits(str(tmp_path / "one"))
