"""graytune extract → transfer → train --method transmiter+, on two tiny CLIPs and an image folder."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from graytune import ArtifactError
from graytune.cli.main import main
from tests.conftest import build_tiny_clip


@pytest.fixture(scope="module")
def two_backbones(tmp_path_factory):  # type: ignore[no-untyped-def]
    from transformers import CLIPModel

    weak = build_tiny_clip(tmp_path_factory.mktemp("weak"))
    strong = build_tiny_clip(tmp_path_factory.mktemp("strong"))
    model = CLIPModel.from_pretrained(strong)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(strong)
    return f"hf-clip:{weak}", f"hf-clip:{strong}"


def image_folder(root):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(0)
    for c in ("ant", "bee", "cow"):
        (root / c).mkdir(parents=True)
        for i in range(10):
            pixels = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return str(root)


def weak_fine_tuned(weak: str, tmp_path, capsys, method: str, steps: str) -> str:  # type: ignore[no-untyped-def]
    """The image folder's path, after ``graytune train`` wrote ``weak``'s adapter to tmp_path/ft (output read)."""
    data = image_folder(tmp_path / "imgs")
    assert main(["train", "--backbone", weak, "--method", method, "--data", data, "--out", str(tmp_path / "ft"),
                 "--max-steps", steps, "--batch-size", "4", "--json"]) == 0
    capsys.readouterr()
    return data


def test_extract_transfer_plus_round_trip(two_backbones, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    weak, strong = two_backbones
    data = weak_fine_tuned(weak, tmp_path, capsys, "dga", "2")
    assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", data,
                 "--out", str(tmp_path / "tm"), "--classes", "16", "--json"]) == 0
    extracted = json.loads(capsys.readouterr().out)
    assert extracted["classes"] == 16 and extracted["task_classes"] == 3
    config = json.loads((tmp_path / "tm" / "adapter_config.json").read_text())
    assert config["classes"][:3] == ["ant", "bee", "cow"] and len(config["classes"]) == 16
    assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", data,
                 "--out", str(tmp_path / "tm"), "--classes", "16"]) == 2  # a finished adapter is kept
    assert "--overwrite" in capsys.readouterr().err

    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", strong, "--data", data,
                 "--out", str(tmp_path / "moved"), "--json"]) == 0
    moved = json.loads(capsys.readouterr().out)
    assert moved["gradient_queries"] == 0 and 0 <= moved["test"]["accuracy"] <= 1
    assert main(["eval", "--backbone", strong, "--adapter", str(tmp_path / "moved"), "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == moved["test"]  # eval reproduces transfer's own test
    moved_config = json.loads((tmp_path / "moved" / "adapter_config.json").read_text())
    assert moved_config["transferred_to"] == strong and moved_config["classes"] == config["classes"]

    assert main(["train", "--backbone", strong, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", data, "--out", str(tmp_path / "plus"), "--shots", "2", "--json"]) == 0
    plus = json.loads(capsys.readouterr().out)
    assert "accuracy" in plus["test"] and "val_accuracy" in plus["best_val"]
    assert json.loads((tmp_path / "plus" / "adapter_config.json").read_text())["method"] == "transmiter+"
    assert main(["eval", "--backbone", strong, "--adapter", str(tmp_path / "plus"), "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"] == plus["test"]  # eval dispatches on the registry's kind

    # TransMiter+ honours the optimiser flags, and refuses those it has no use for
    assert main(["train", "--backbone", strong, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", data, "--out", str(tmp_path / "plus2"), "--shots", "2", "--max-steps", "2",
                 "--lr", "0.01", "--batch-size", "3", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert (train["max_steps"], train["lr"], train["batch_size"]) == (2, 0.01, 3)
    assert main(["train", "--backbone", strong, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", data, "--out", str(tmp_path / "z"), "--grad-accum", "2"]) == 2
    assert "does not use --grad-accum" in capsys.readouterr().err

    assert main(["train", "--backbone", weak, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", data, "--out", str(tmp_path / "x")]) == 2  # made for the strong backbone
    assert "transfer it there first" in capsys.readouterr().err
    assert main(["transfer", "--adapter", str(tmp_path / "moved"), "--strong", strong, "--data", data,
                 "--out", str(tmp_path / "y")]) == 2
    assert "already transferred" in capsys.readouterr().err
    with pytest.raises(ArtifactError):
        from graytune.transfer.transmiter import load_transmiter

        load_transmiter(tmp_path / "ft")  # a DGA adapter is not a TransMiter one


def test_the_chain_prints_tables_and_transmiter_plus_writes_its_history(two_backbones, tmp_path,
                                                                        capsys) -> None:  # type: ignore[no-untyped-def]
    """extract printed a raw loss list, transfer and transmiter+ a dict repr, and transmiter+ wrote no history."""
    weak, strong = two_backbones
    data = weak_fine_tuned(weak, tmp_path, capsys, "output", "1")
    assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", data,
                 "--out", str(tmp_path / "tm"), "--classes", "8"]) == 0
    out = capsys.readouterr().out
    assert "extract_loss" in out and "at epoch 1" in out and "[" not in out
    assert main(["transfer", "--adapter", str(tmp_path / "tm"), "--strong", strong, "--data", data,
                 "--out", str(tmp_path / "moved")]) == 0
    out = capsys.readouterr().out
    assert "test accuracy %" in out and "{" not in out
    plus = tmp_path / "plus"
    assert main(["train", "--backbone", strong, "--method", "transmiter+", "--adapter", str(tmp_path / "moved"),
                 "--data", data, "--out", str(plus), "--shots", "2", "--max-steps", "3", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"transmiter+ on {strong} (black-box)") and "3 steps at lr" in out
    assert "  test accuracy %" in out and "{" not in out and out.endswith(f"saved to {plus}\n")

    records = [json.loads(line) for line in (plus / "history.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "run" and records[0]["method"] == "transmiter+"
    vals = [r for r in records if r["event"] == "val"]
    assert vals[0]["step"] == 0 and vals[-1]["step"] == 3 and all(r["primary"] == "accuracy" for r in vals)
    assert [r["step"] for r in records if r["event"] == "step"] == [r["step"] for r in vals[1:]]
    kept = json.loads((plus / "adapter_config.json").read_text())["plus"]
    best = [r for r in vals if r["best"]][-1]
    assert best["epoch"] == kept["epoch"] and best["metrics"]["accuracy"] == pytest.approx(kept["val_accuracy"])
    assert main(["plot", str(plus), "--out", str(tmp_path / "plus.png")]) == 0  # "made before history" no more
    capsys.readouterr()
    assert main(["eval", "--adapter", str(plus), "--data", data]) == 0  # the backbone: the artifact's
    out = capsys.readouterr().out
    assert out.startswith(f"transmiter+ on {strong}, {data} test split:") and "  accuracy %" in out


def test_extract_aux_draw_takes_effect_and_is_recorded(two_backbones, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    weak, _ = two_backbones
    data = weak_fine_tuned(weak, tmp_path, capsys, "output", "1")
    drawn = {}
    for draw in ("balanced", "concrete"):
        assert main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", data,
                     "--out", str(tmp_path / draw), "--classes", "40", "--aux-draw", draw, "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["aux_draw"] == draw
        config = json.loads((tmp_path / draw / "adapter_config.json").read_text())
        assert config["aux_draw"] == draw and config["classes"][:3] == ["ant", "bee", "cow"]
        drawn[draw] = config["classes"][3:]
    assert drawn["balanced"] != drawn["concrete"]  # the flag changes the names drawn, same seed
    with pytest.raises(SystemExit) as refused:
        main(["extract", "--weak", weak, "--adapter", str(tmp_path / "ft"), "--data", data,
              "--out", str(tmp_path / "x"), "--aux-draw", "uniform"])
    assert refused.value.code == 2 and "balanced" in capsys.readouterr().err
