"""graytune methods, --option, warm starts and parse-time refusals: every flag takes effect or is refused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from graytune.cli.main import main
from graytune.methods import METHODS


def test_methods_json_lists_every_method_with_derived_levels(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(METHODS)
    assert {n: r["access"] for n, r in rows.items()} == {
        "zero-shot": "black-box", "output": "black-box", "output-mlp": "black-box", "dga": "dark-gray",
        "dga-zo": "black-box", "prompt-zo": "black-box", "prompt": "dark-gray",
        "lga": "light-gray", "adalink": "dark-gray", "lora": "white-box", "full": "white-box",
        "transmiter": "black-box", "transmiter+": "black-box", "adalink+output": "dark-gray", "dga-id": "dark-gray",
        "lga-id": "light-gray", "lga-deep": "light-gray"}
    assert rows["adalink"]["reads"] == ["image.patch_embeds", "text.token_embeds"] and rows["dga"]["reads"] == []
    assert rows["adalink+output"]["reads"] == ["text.token_embeds"]
    assert {n for n, r in rows.items() if r["zeroth_order"]} == {"dga-zo", "prompt-zo"}
    assert "--zo spsa|spsa-gc|zip|mezo" in rows["dga-zo"]["trained_by"] and "zeroth-order" in rows["dga-zo"]["trains"]
    assert rows["full"]["lr"] == 3e-5 and rows["dga"]["lr"] == 3e-3 and rows["zero-shot"]["lr"] is None
    lm = {n for n, r in rows.items() if "causal-lm" in r["backbones"]}  # output adapters need an embedding
    assert lm == {"zero-shot", "prompt", "dga", "lga", "lga-deep", "adalink", "prompt-zo", "lora", "full"}
    assert {"key": "rank", "adapter": "lora", "type": "int", "default": 8} .items() <= rows["lora"]["options"][0].items()
    assert main(["methods", "lora"]) == 0
    assert "--option rank=8" in capsys.readouterr().out


def _pairs(tmp_path):  # type: ignore[no-untyped-def]
    from tests.data.test_catalog import write_pairs

    return str(write_pairs(tmp_path / "data", n=30))


def test_lora_with_options_then_eval_needs_no_flag(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--data", _pairs(tmp_path), "--json"]
    out = tmp_path / "lora"
    assert main(["train", *base, "--method", "lora", "--option", "rank=4", "--option", "alpha=8",
                 "--out", str(out), "--max-steps", "2", "--batch-size", "4"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["access"] == "white-box" and trained["lr"] == METHODS["lora"].lr  # the registry's default
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["options"]["lora"]["rank"] == 4 and config["r"] == 4 and config["lora_alpha"] == 8
    assert all(t.shape[0] == 4 or t.shape[1] == 4 for k, t in load_file(str(out / "adapter_model.safetensors")).items()
               if "lora_" in k)
    assert main(["eval", *base, "--adapter", str(out), "--split", "test"]) == 0  # the fifth train held out
    assert json.loads(capsys.readouterr().out)["test"] == trained["test"]

    assert main(["train", *base, "--method", "lora", "--option", "rnk=4", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'rnk'" in err and "rank (int, default 8)" in err and "Traceback" not in err
    assert main(["train", *base, "--method", "dga", "--shots", "4", "--out", str(tmp_path / "x")]) == 2
    assert "--shots is for --method transmiter+" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--image-size", "0", "must be a positive integer"), ("--warmup", "1", "warmup must be >= 0 and < 1"),
    ("--lr", "-1", "lr must be >= 0"), ("--max-steps", "0", "max_steps must be >= 1"),
    ("--batch-size", "-4", "batch_size must be >= 1"), ("--patience", "-1", "patience must be >= 0"),
    ("--option", "rank", "is not KEY=VALUE")])
def test_bad_values_are_refused_at_parse_time(flag: str, value: str, says: str, capsys) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--backbone", "minilm", "--method", "dga", "--data", "x", "--out", "y", flag, value])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_adapter_warm_starts_the_same_method(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--data", _pairs(tmp_path), "--json", "--batch-size", "4"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *base, "--method", "dga", "--out", str(first), "--max-steps", "3"]) == 0
    # lr 0: the second run changes nothing, so it ends exactly where the warm start began
    assert main(["train", *base, "--method", "dga", "--adapter", str(first), "--out", str(second),
                 "--max-steps", "1", "--lr", "0"]) == 0
    capsys.readouterr()
    a, b = (load_file(str(f / "adapter_model.safetensors")) for f in (first, second))
    assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)
    assert json.loads((second / "adapter_config.json").read_text())["warm_start"] == str(first)
    assert main(["train", *base, "--method", "output", "--adapter", str(first), "--out", str(tmp_path / "x")]) == 2
    assert "holds a 'dga' adapter" in capsys.readouterr().err


def test_retry_s_reaches_the_remote_handle_and_is_refused_in_process(monkeypatch, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import graytune.recipes.run as recipe

    seen = {}

    def fake_open(backbone_id, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(backbone=backbone_id, **kwargs)
        raise KeyboardInterrupt  # stop before any network work

    monkeypatch.setattr(recipe, "open_backbone", fake_open)
    args = ["train", "--method", "output", "--data", "wordnet-supersense", "--out", str(tmp_path / "r")]
    assert main([*args, "--backbone", "http://127.0.0.1:9", "--retry-s", "300"]) == 130
    assert seen["backbone"] == "http://127.0.0.1:9" and seen["retry_s"] == 300.0
    assert main([*args, "--backbone", "minilm", "--retry-s", "300"]) == 2
    assert "--retry-s is for a served backbone" in capsys.readouterr().err
