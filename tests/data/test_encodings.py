"""Text that is not UTF-8 is named where it is (issue 28 item 4), a UTF-8 byte-order mark is read, and a label
column with one class is refused (item 5): CLI runs with the bad file, before any backbone loads."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from graytune.cli.main import main
from tests.data.test_catalog import write_pairs

CAFE = "a café on the corner"


def train(data: str, out: str) -> list[str]:
    return ["train", "--backbone", "minilm", "--method", "output", "--data", data, "--out", out, "--max-steps", "1"]


def latin1_pairs(folder) -> str:  # type: ignore[no-untyped-def]
    csv = write_pairs(folder, n=12)
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].split(",")[0] + "," + CAFE
    csv.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return str(csv)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "coco"])
def test_non_utf8_captions_name_the_file_and_row(fmt, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    csv = latin1_pairs(tmp_path / "d")
    rows = [line.split(",", 1) for line in open(csv, encoding="latin-1").read().splitlines()[1:]]
    if fmt == "csv":
        data, where = csv, "row 4"
    elif fmt == "jsonl":
        data, where = str(tmp_path / "d" / "pairs.jsonl"), "line 3"
        text = "".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False) + "\n" for i, c in rows)
        (tmp_path / "d" / "pairs.jsonl").write_bytes(text.encode("latin-1"))
    else:
        data, where = str(tmp_path / "d" / "captions_x.json"), "line 1"
        coco = {"images": [{"id": n, "file_name": i} for n, (i, _) in enumerate(rows)],
                "annotations": [{"id": n, "image_id": n, "caption": c} for n, (_, c) in enumerate(rows)]}
        (tmp_path / "d" / "captions_x.json").write_bytes(json.dumps(coco, ensure_ascii=False).encode("latin-1"))
    assert main(train(data, str(tmp_path / "o"))) == 2
    err = capsys.readouterr().err
    assert f"{data} {where} is not UTF-8 (byte 0xe9 near '" in err and "a caf\ufffd on" in err
    assert "save the file as UTF-8" in err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err


def test_a_shard_member_that_is_not_utf8_is_named(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    write_pairs(tmp_path / "d", n=2)
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, text in enumerate(("a picture", CAFE)):
            for name, payload in ((f"{i:05d}.png", (tmp_path / "d" / f"im{i}.png").read_bytes()),
                                  (f"{i:05d}.txt", text.encode("latin-1"))):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    assert main(["eval", "--backbone", "minilm", "--data", str(shard)]) == 2
    err = capsys.readouterr().err
    assert f"{shard} member 00001.txt is not UTF-8 (byte 0xe9" in err and "as UTF-8" in err


def test_a_utf8_byte_order_mark_is_read(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    csv = write_pairs(tmp_path / "d", n=12)
    csv.write_bytes(b"\xef\xbb\xbf" + csv.read_text().replace("number 1\n", "number ✓\n").encode("utf-8"))
    assert main(["eval", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(csv), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 12


def test_a_label_column_with_one_class_is_refused(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    csv = write_pairs(tmp_path / "d", n=12)
    csv.write_text("image,label\n" + "".join(f"im{i}.png,cat\n" for i in range(12)))
    flags = train(str(csv), str(tmp_path / "o"))
    flags[flags.index("minilm")] = f"hf-clip:{tiny_clip_dir}"  # an image backbone: it would train (100 %)
    assert main([*flags, "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "every row has the label 'cat'; classification needs at least 2 classes" in err
