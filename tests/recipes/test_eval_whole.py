"""``graytune eval`` scores a file without splits whole (issue 28 item 3): a held-out test file, a COCO
JSON or a shard is every item of it, never a re-split fifth; a file's own splits and ``--split`` still pick."""

from __future__ import annotations

import json

from graytune.cli.main import main
from graytune.data.catalog import load_splits
from tests.data.test_catalog import write_pairs
from tests.data.test_user_data import write_coco, write_shards


def test_a_file_without_splits_is_scored_whole(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    base = ["eval", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", pairs]
    assert main([*base, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["items"] == 30 and whole["split"] == "all" and "scored whole (30 items)" in whole["data_note"]
    assert main([*base, "--json", "--split", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == whole["test"]
    assert main([*base, "--json", "--split", "test"]) == 0  # asked for: the fifth graytune train holds out
    assert json.loads(capsys.readouterr().out)["items"] == 6
    assert main(base) == 0
    out = capsys.readouterr().out
    assert "--split test scores the 20 %" in out and f"{pairs} whole (30 items):" in out


def test_coco_json_and_shards_are_scored_whole(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    write_pairs(tmp_path / "d", n=15)
    rows = [(tmp_path / "d" / f"im{i}.png", f"a picture number {i}", "x") for i in range(15)]
    for data in (str(write_coco(tmp_path / "coco", rows)), write_shards(tmp_path / "shards", rows)):
        assert main(["eval", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", data, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["items"] == 15


def test_a_file_that_carries_splits_is_scored_on_its_test_split(tmp_path) -> None:
    lines = "".join(f"im{i}.png,a picture number {i},{('train', 'val', 'test')[i % 3]}\n" for i in range(12))
    write_pairs(tmp_path, n=12)
    (tmp_path / "split.csv").write_text("image,caption,split\n" + lines)
    s = load_splits(str(tmp_path / "split.csv"), whole_if_unsplit=True)
    assert not s.whole and len(s.test) == 4
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f" {i}"}) + "\n"
                                               for i in range(12)))
    s = load_splits(str(tmp_path / "qa.jsonl"), whole_if_unsplit=True)  # prompt/completion data too
    assert s.whole and s.task == "generation" and len(s.test) == 12
