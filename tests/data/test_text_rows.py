"""Text classification rows (``text,label[,split]`` in a CSV or JSONL): a set of labelled texts like the built-in
wordnet-supersense, with the classes of image label files (sorted), their checks, and training end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from graytune import InvalidInputError
from graytune.data.catalog import TEXT_PROMPT, load_splits
from graytune.data.files import read_rows
from graytune.data.labeled import LabeledTexts

TOPICS = {"sports": ["The team won the final match", "She ran a marathon, in record time", "The keeper saved a penalty",
                     "He scored three goals tonight", "The tennis final went to five sets"],
          "cooking": ["Simmer the onions until golden", "Bake the bread for forty minutes", "Add salt to taste",
                      "Whisk the eggs with sugar", 'Grill the "catch of the day" over hot coals'],
          "weather": ["Heavy rain is expected tomorrow", "A cold front brings snow", "Sunny skies all weekend",
                      "Strong winds toppled trees", "Fog will clear by noon"],
          "music": ["The orchestra played a symphony", "She sang the ballad beautifully", "The guitar solo was loud",
                    "A new album drops on Friday", "The drummer kept steady time"]}
ROWS = [(text, label) for label, texts in TOPICS.items() for text in texts]  # labels first seen: sports, cooking …


def write_texts(path: Path, rows, header=("text", "label")) -> Path:  # type: ignore[no-untyped-def]
    """``rows`` as a CSV with ``header`` or, for a ``.jsonl`` path, one object per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, row))) + "\n" for row in rows))
        return path
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_text_rows_make_a_set_of_labelled_texts(tmp_path, suffix: str) -> None:  # type: ignore[no-untyped-def]
    train = write_texts(tmp_path / f"train{suffix}", ROWS)
    val = write_texts(tmp_path / f"val{suffix}", [("The striker missed", "sports"), ("Thunder overnight", "weather")])
    s = load_splits(None, train=str(train), val=str(val))
    assert s.task == "classification" and s.prompt == TEXT_PROMPT == "a text about {}"
    assert isinstance(s.train, LabeledTexts) and isinstance(s.val, LabeledTexts) and s.test is None
    assert s.train.class_names == ("cooking", "music", "sports", "weather")  # sorted, as image label files
    assert s.train.texts == tuple(text for text, _ in ROWS)  # quotes and commas read back as written
    assert [s.train.class_names[y] for y in s.train.labels.tolist()] == [label for _, label in ROWS]
    assert s.val.class_names == s.train.class_names and s.val.labels.tolist() == [2, 3]
    with pytest.raises(InvalidInputError, match="every row has the label 'sports'; classification needs at least 2"):
        load_splits(str(write_texts(tmp_path / f"one{suffix}", [(t, "sports") for t, _ in ROWS])))


def test_a_val_label_outside_the_training_classes_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train = write_texts(tmp_path / "train.csv", ROWS)
    val = write_texts(tmp_path / "val.csv", [("The striker missed", "sports"), ("Oil prices fell", "finance")])
    with pytest.raises(InvalidInputError, match=r"\['finance'\] \(first at val\.csv row 3\) are not among the "
                                                r"training classes \['cooking', 'music', 'sports', 'weather'\]"):
        load_splits(None, train=str(train), val=str(val))


@pytest.mark.parametrize(("header", "row", "expected"), [
    (("text", "label"), ("", "sports"), r"bad\.csv row 3 of .*: its text is empty \(\{'text': '', 'label': "),
    (("text", "label"), ("   ", "sports"), "row 3 .*its text is empty"),
    (("text", "label"), ("A long walk", ""), r"row 3 .*its label is empty .*'label': ''"),
    (("text", "label", "caption"), ("A walk", "sports", "a caption"), "row 3 .*it has a caption"),
    (("image", "text", "label"), ("a.png", "A walk", "sports"), "row 3 .*has both an image and a text"),
    (("image", "text", "label"), ("", "", "sports"), r"row 3 .*needs 'image' with 'caption' or 'label', or 'text'"),
])
def test_bad_text_rows_are_refused_with_their_row(tmp_path, header, row, expected) -> None:  # type: ignore[no-untyped-def]
    first = tuple({"text": "The team won", "label": "sports"}.get(column, "") for column in header)  # a good row
    path = write_texts(tmp_path / "bad.csv", [first, row], header)
    with pytest.raises(InvalidInputError, match=expected):
        read_rows(path)


def test_bad_jsonl_text_rows_name_their_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "The team won", "label": "sports"}\n{"label": "sports"}\n')
    with pytest.raises(InvalidInputError, match=r"bad\.jsonl line 2 of .*needs 'image' .* got \{'label': 'sports'\}"):
        read_rows(path)
    path.write_text('{"text": "The team won", "label": "sports"}\n{"image": "a.png", "label": "sports"}\n')
    with pytest.raises(InvalidInputError, match=r"line 2 of .* is an image row but its first row \(bad\.jsonl line 1\) is a text row"):
        read_rows(path)
    with pytest.raises(InvalidInputError, match="needs a header with .*'text' and 'label'"):
        read_rows(write_texts(tmp_path / "h.csv", [("The team won",)], ("text",)))


def test_a_split_column_and_a_re_split_work_for_texts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    splits = ["train", "train", "validation", "test", "test"] * 4
    path = write_texts(tmp_path / "split.jsonl", [(t, y, s) for (t, y), s in zip(ROWS, splits)],
                       ("text", "label", "split"))
    s = load_splits(str(path))
    assert (len(s.train), len(s.val), len(s.test)) == (8, 4, 8) and s.prompt == TEXT_PROMPT
    assert s.test.texts == tuple(t for (t, _), split in zip(ROWS, splits) if split == "test")
    assert s.test.class_names == s.train.class_names == ("cooking", "music", "sports", "weather")
    plain = load_splits(str(write_texts(tmp_path / "plain.csv", ROWS)))
    assert (len(plain.train), len(plain.val), len(plain.test)) == (14, 2, 4) and "re-split 70/10/20" in plain.note
    assert sorted(plain.train.texts + plain.val.texts + plain.test.texts) == sorted(t for t, _ in ROWS)


def test_text_and_image_split_files_are_not_mixed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    images = write_texts(tmp_path / "images.csv", [("a.png", "sports"), ("a.png", "music")], ("image", "label"))
    with pytest.raises(InvalidInputError, match=r"--train .*train\.csv holds texts but --val holds images"):
        load_splits(None, train=str(write_texts(tmp_path / "train.csv", ROWS)), val=str(images))


def test_minilm_trains_on_a_text_csv(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from graytune.recipes.run import RunSpec, train_and_save
    from graytune.train.trainer import TrainConfig

    train = write_texts(tmp_path / "texts.csv", ROWS)
    val = write_texts(tmp_path / "texts_val.csv", [("The striker missed", "sports"), ("Stir the soup", "cooking")])
    summary = train_and_save(RunSpec(backbone="minilm", access=None, method="dga", data=None, out=str(tmp_path / "out"),
                                     files={"train": str(train), "val": str(val)},
                                     train=TrainConfig(max_steps=2, batch_size=4)), progress=False)
    assert summary["steps"] == 2 and summary["split_sizes"] == {"train": 20, "val": 2, "test": None}
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert "a text about {}" in json.dumps(config) and (tmp_path / "out" / "adapter_model.safetensors").is_file()
