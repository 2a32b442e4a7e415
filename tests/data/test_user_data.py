"""The data users bring, made by the tests from real Tux Paint drawings: WebDataset shards, COCO captions,
image,label CSVs, split columns and split files; clear errors for everyday file mistakes."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from graytune import InvalidInputError
from graytune.cli.main import main
from graytune.data.catalog import load_splits
from graytune.data.tuxpaint import load_tuxpaint

N = 30


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> list[tuple[Path, str, str]]:  # type: ignore[no-untyped-def]
    """``N`` real drawings (resized copies, 48 px) with their captions and categories."""
    data, out = load_tuxpaint(), tmp_path_factory.mktemp("drawings")
    rows = []
    for i in range(N):
        with Image.open(data.images[i * 7]) as image:
            path = out / f"d{i:03d}.png"
            image.convert("RGB").resize((48, 48)).save(path)
        rows.append((path, data.captions[i * 7], data.categories[i * 7]))
    return rows


def write_shards(folder: Path, rows, per_shard: int = 12) -> str:  # type: ignore[no-untyped-def]
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(rows), per_shard):
        with tarfile.open(folder / f"shard-{s // per_shard:03d}.tar", "w") as tar:
            for i, (path, caption, _) in enumerate(rows[s:s + per_shard], start=s):
                for name, payload in ((f"{i:05d}.png", path.read_bytes()), (f"{i:05d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    last = (len(rows) - 1) // per_shard
    return str(folder / f"shard-{{000..{last:03d}}}.tar")


def write_coco(folder: Path, rows) -> Path:  # type: ignore[no-untyped-def]
    images_dir = folder / "val2017"
    images_dir.mkdir(parents=True)
    images, annotations = [], []
    for i, (path, caption, _) in enumerate(rows):
        (images_dir / path.name).write_bytes(path.read_bytes())
        images.append({"id": 100 + i, "file_name": path.name, "width": 48, "height": 48})
        for k, text in enumerate((caption, f"a drawing, number {i}")):  # several captions per image
            annotations.append({"id": 10 * i + k, "image_id": 100 + i, "caption": text})
    (folder / "annotations").mkdir()
    path = folder / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return path


def test_webdataset_shards_and_coco_json_train_and_eval(tiny_clip_dir, drawings, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    shards = write_shards(tmp_path / "shards", drawings)
    coco = write_coco(tmp_path / "coco", drawings)
    s = load_splits(shards)
    assert s.task == "retrieval" and len(s.train) + len(s.val) + len(s.test) == N and "re-split" in s.note
    c = load_splits(str(coco))
    assert len(c.train.captions) == 2 * len(c.train)  # five (here two) captions per image stay together
    for data in (shards, str(coco)):
        out = tmp_path / Path(data).stem.replace("{", "").replace("}", "")
        base = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--data", data, "--json"]
        assert main(["train", *base, "--method", "dga", "--out", str(out), "--max-steps", "2", "--batch-size",
                     "4"]) == 0
        trained = json.loads(capsys.readouterr().out)
        assert "re-split 70/10/20" in trained["data_note"]
        assert main(["eval", *base, "--adapter", str(out), "--split", "test"]) == 0  # the fifth train held out
        assert json.loads(capsys.readouterr().out)["test"] == trained["test"]


def test_labels_split_column_split_files_and_eval_all(tiny_clip_dir, drawings, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    seen, split = set(), []
    for i, (_, _, cat) in enumerate(drawings):  # a category's first drawing trains; the others cycle
        split.append("train" if cat not in seen else ("train", "val", "test")[i % 3])
        seen.add(cat)
    lines = "".join(f"{p},{cat},{sp}\n" for (p, _, cat), sp in zip(drawings, split))
    (tmp_path / "labels.csv").write_text("image,label,split\n" + lines)
    s = load_splits(str(tmp_path / "labels.csv"))
    counts = tuple(split.count(k) for k in ("train", "val", "test"))
    assert s.task == "classification" and (len(s.train), len(s.val), len(s.test)) == counts and not s.note
    assert list(s.train.class_names) == sorted(seen)

    for name, rows in (("train", drawings[:20]), ("val", drawings[20:25]), ("test", drawings[25:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"image": str(p), "caption": c}) + "\n"
                                                        for p, c, _ in rows))
    files = ["--train", str(tmp_path / "train.jsonl"), "--val", str(tmp_path / "val.jsonl"),
             "--test", str(tmp_path / "test.jsonl")]
    base = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--json"]
    assert main(["train", *base, *files, "--method", "output", "--out", str(tmp_path / "o"), "--max-steps", "2",
                 "--batch-size", "4"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["data_note"] == "" and "mean_recall" in trained["test"]
    assert main(["eval", *base, "--adapter", str(tmp_path / "o"), "--data", str(tmp_path / "test.jsonl"),
                 "--split", "all"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["items"] == 5 and whole["split"] == "all"  # the held-out file scored whole, never re-split
    assert main(["eval", *base, "--data", "fashion-mnist", "--split", "all"]) == 2
    assert "built-in set with fixed splits" in capsys.readouterr().err


def test_everyday_file_mistakes_say_where(drawings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows = list(drawings[:12])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows[4] = (broken, "a broken file", "x")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(f"{p},{c}\n" for p, c, _ in rows))
    s = load_splits(str(tmp_path / "pairs.csv"))
    from graytune.data.images import ImagePreprocess
    from graytune.data.stream import PixelStream
    from graytune.train.tasks import image_stream

    data = s.train if broken in s.train.images else s.val if broken in s.val.images else s.test
    stream = image_stream(data, ImagePreprocess(32, "crop", (0.5,) * 3, (0.5,) * 3), None)  # type: ignore[arg-type]
    assert isinstance(stream, PixelStream)
    with pytest.raises(InvalidInputError, match=r"cannot read image .*broken\.png \(pairs\.csv row 6\)"):
        list(stream.sequential(64))
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n{oops\n")
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_splits(str(tmp_path / "bad.jsonl"))
    with pytest.raises(InvalidInputError, match="no such file or folder: .*missing.csv"):
        load_splits(str(tmp_path / "missing.csv"))
