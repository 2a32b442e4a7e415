"""TransMiter on text queries: a tiny weak BERT (32-d) → a tiny strong MPNet (48-d), other tokenizer and width."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

import graytune
from graytune import InvalidInputError
from graytune.cli.main import main
from graytune.data.catalog import Splits
from graytune.data.labeled import LabeledImages, LabeledTexts
from graytune.transfer.procrustes import orthogonal_procrustes
from graytune.recipes.transmiter import load_queries
from graytune.transfer.transmiter import ExtractConfig, TransMiter
from tests.backbones.tiny_text_vision import build_tiny_bert, build_tiny_dinov2, build_tiny_mpnet

CLASSES = ("animal", "weather", "trip")
WORDS = {"animal": "cat dog cats dogs sleeps sleep small", "weather": "rain on roof away sleep small",
         "trip": "run far away photo of the"}
PROMPT = "a text about {}"


def tiny_texts(name: str = "tiny-texts", class_names: tuple[str, ...] = CLASSES) -> Splits:
    """A three-class text set: train 30, val 12, test 15, words drawn per class with a fixed seed."""
    rng = random.Random(0)

    def part(n: int) -> LabeledTexts:
        labels = [i % len(CLASSES) for i in range(n)]
        texts = tuple(" ".join(rng.choices(WORDS[CLASSES[y]].split(), k=4)) for y in labels)
        return LabeledTexts(name, texts, torch.tensor(labels), class_names)

    return Splits(name, "classification", part(30), part(12), part(15), prompt=PROMPT,
                  eval_splits={"base": (0, 1), "novel": (2,)})


@pytest.fixture(scope="module")
def pair(tmp_path_factory):  # type: ignore[no-untyped-def]
    weak = build_tiny_bert(tmp_path_factory.mktemp("weak-bert"))
    strong = build_tiny_mpnet(tmp_path_factory.mktemp("strong-mpnet"), dim=48)
    return f"hf-text:{weak}", f"hf-text:{strong}"


def test_text_queries_extract_and_transfer_across_widths_and_tokenizers(pair):  # type: ignore[no-untyped-def]
    weak = graytune.open_backbone(pair[0], access="black-box")
    strong = graytune.open_backbone(pair[1], access="black-box")
    splits = tiny_texts()
    q = load_queries(splits, weak)
    assert q.unlabeled == list(splits.train.texts) and q.test == list(splits.test.texts)  # texts, tokenized by each
    assert weak.encode_text(q.test[:2]).shape == (2, 32) and strong.encode_text(q.test[:2]).shape == (2, 48)
    assert sorted(load_queries(splits, weak, shots=2).train_labels.tolist()) == [0, 0, 1, 1, 2, 2]

    # the auxiliary names this test's expectations were set with (the default, balanced draw: test_classes.py)
    tm = TransMiter.create(list(CLASSES), total=16, seed=0, prompt=PROMPT, aux_draw="concrete")
    weak_u, strong_u = tm.scores(weak, q.unlabeled), tm.scores(strong, q.unlabeled)
    assert weak_u.shape == strong_u.shape == (30, 16) and not torch.allclose(weak_u, strong_u)
    teacher = weak_u[:, :3] + torch.tensor([0.0, 0.0, 30.0])  # the fine-tuned weak model favours "trip"
    tm.extract(weak_u, teacher, ExtractConfig(epochs=20, batch_size=8, lr=3e-3), progress=False)
    moved = tm.transfer(weak_u, strong_u, beta=1.0)

    # the moved adapter is the formula: W' = Rᵀ W with R = Procrustes(H_t, H_s), applied to strong's text scores
    strong_test = 100 * F.normalize(strong.encode_text(q.test), dim=-1) @ F.normalize(
        strong.encode_text([PROMPT.format(c) for c in tm.classes]), dim=-1).T  # [15, 16]
    w = tm.adapter.weight  # [16, 16]
    std = tm.adapter.standardise
    rotation = orthogonal_procrustes(std(strong_u)[0] @ w.T, std(weak_u)[0] @ w.T, 1.0)
    w_new = rotation.T @ w
    z, mean, sd = std(strong_test)
    with torch.no_grad():
        h = z @ w_new.T
        expected = ((h + tm.adapter.mlp(h)) @ w_new) * (sd + 1e-6) + mean
    got = moved.predict(strong, q.test)
    torch.testing.assert_close(got, expected[:, :3], atol=1e-3, rtol=1e-4)
    assert not torch.allclose(rotation, torch.eye(16), atol=1e-3)  # the basis change did something
    assert (got.argmax(1) != strong_test[:, :3].argmax(1)).any()  # it changes strong's zero-shot predictions
    assert weak.exposure.gradient_queries == strong.exposure.gradient_queries == 0


def test_queries_that_a_backbone_has_no_tower_for_are_refused(pair, tmp_path) -> None:  # type: ignore[no-untyped-def]
    text_only = graytune.open_backbone(pair[0], access="black-box")
    image_only = graytune.open_backbone(f"hf-vision:{build_tiny_dinov2(tmp_path / 'dino')}", access="black-box")
    with pytest.raises(InvalidInputError, match=r"tiny-texts holds text items.*has image only.*text encoder"):
        load_queries(tiny_texts(), image_only)
    images = LabeledImages("tiny-images", torch.zeros(6, 8, 8, dtype=torch.uint8), torch.arange(6) % 2, ("a", "b"))
    image_set = Splits("tiny-images", "classification", images, images, images, prompt="{}")
    with pytest.raises(InvalidInputError, match=r"holds image items.*needs the image and text tower.*has text only"):
        load_queries(image_set, text_only)
    with pytest.raises(InvalidInputError, match="whose items are texts; leave --image-size out"):
        load_queries(tiny_texts(), text_only, image_size=32)


def test_cli_extract_transfer_plus_on_texts(pair, tmp_path, capsys, monkeypatch):  # type: ignore[no-untyped-def]
    sets = {"tiny-texts": tiny_texts(), "other-texts": tiny_texts("other-texts", ("x", "y", "z"))}
    fake = lambda name, *a, **k: sets[name]  # noqa: E731
    monkeypatch.setattr("graytune.recipes.run.load_splits", fake)
    monkeypatch.setattr("graytune.recipes.transmiter.load_splits", fake)
    weak, strong = pair
    assert main(["train", "--backbone", weak, "--method", "dga", "--data", "tiny-texts", "--out", str(tmp_path / "ft"),
                 "--max-steps", "2", "--batch-size", "4", "--json"]) == 0
    capsys.readouterr()
    assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", "tiny-texts",
                 "--out", str(tmp_path / "tm"), "--classes", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task_classes"] == 3
    config = json.loads((tmp_path / "tm" / "adapter_config.json").read_text())
    assert config["queries"] == "text" and config["image_size"] is None and config["classes"][:3] == list(CLASSES)

    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", strong, "--data", "tiny-texts",
                 "--out", str(tmp_path / "moved"), "--image-size", "32"]) == 2
    assert "items are texts; leave --image-size out" in capsys.readouterr().err
    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", strong, "--data", "other-texts",
                 "--out", str(tmp_path / "moved")]) == 2
    assert "use the data set it was extracted on" in capsys.readouterr().err
    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", strong, "--data", "tiny-texts",
                 "--out", str(tmp_path / "moved"), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["gradient_queries"] == 0 and {"accuracy", "base_accuracy", "novel_accuracy"} <= set(moved["test"])
    assert main(["eval", "--backbone", strong, "--adapter", str(tmp_path / "moved"), "--data", "tiny-texts",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == moved["test"]  # eval scores texts the same way

    assert main(["train", "--backbone", strong, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", "tiny-texts", "--out", str(tmp_path / "plus"), "--shots", "2", "--max-steps", "2",
                 "--json"]) == 0
    plus = json.loads(capsys.readouterr().out)
    assert "accuracy" in plus["test"] and "val_accuracy" in plus["best_val"]
    assert json.loads((tmp_path / "plus" / "adapter_config.json").read_text())["queries"] == "text"
