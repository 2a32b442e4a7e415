"""A split column with train and test rows but no val: 10 % of train is held out for validation, as --train
without --val does, and the note says so (it was refused: "no row has split 'val'")."""

from __future__ import annotations

import pytest

from graytune.data.catalog import load_splits
from graytune.errors import InvalidInputError
from tests.data.test_catalog import write_pairs


def _with_splits(path, splits: list[str]):  # type: ignore[no-untyped-def]
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0] + ",split", *(f"{row},{s}" for row, s in zip(lines[1:], splits))]) + "\n")
    return path


def test_no_val_rows_hold_out_a_tenth_of_train(tmp_path) -> None:  # type: ignore[no-untyped-def]
    csv = _with_splits(write_pairs(tmp_path, n=30), ["train"] * 20 + ["test"] * 10)
    splits = load_splits(str(csv))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (18, 2, 10)
    assert "no val rows" in splits.note and "2 items, seed 0" in splits.note
    held = set(splits.val.captions)
    assert held.isdisjoint(splits.train.captions) and held <= {f"a picture number {i}" for i in range(20)}
    assert set(load_splits(str(csv), seed=1).val.captions) != held  # drawn with the seed


def test_train_and_test_rows_are_still_required(tmp_path) -> None:  # type: ignore[no-untyped-def]
    csv = _with_splits(write_pairs(tmp_path, n=12), ["train"] * 10 + ["val"] * 2)
    with pytest.raises(InvalidInputError, match="no row has split 'test'"):
        load_splits(str(csv))


def test_graytune_train_says_it_held_out_val(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from graytune.cli.main import main

    csv = _with_splits(write_pairs(tmp_path / "data", n=30), ["train"] * 20 + ["test"] * 10)
    assert main(["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--method", "output", "--data", str(csv),
                 "--out", str(tmp_path / "out"), "--max-steps", "1", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "note: " in out and "held out for validation" in out and "train 18 / val 2 / test 10" in out
