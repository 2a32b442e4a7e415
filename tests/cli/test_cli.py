"""The command line: info shows specs (never weights), errors exit 2 with a suggestion, demo prints a table."""

from __future__ import annotations

import json

import pytest

from graytune.cli.main import main


def test_info_prints_ports_for_the_level(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "efficientnet-lite0", "--access", "dark-gray"]) == 0
    out = capsys.readouterr().out
    assert "image.pixels" in out and "[B, 1000]" in out and "fingerprint" in out
    assert "image.layer." not in out  # entry ports need light-gray
    assert main(["info", "efficientnet-lite0", "--access", "light-gray"]) == 0
    assert "image.layer." in capsys.readouterr().out


def test_info_json_is_the_spec_and_holds_no_weights(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "minilm", "--json"]) == 0
    text = capsys.readouterr().out
    data = json.loads(text)
    assert data["access"] == "dark-gray" and data["id"] == "minilm"
    assert {p["name"] for p in data["ports"]} >= {"text.token_embeds", "text.embeds"}
    assert len(text) < 20_000  # plain data: names, shapes, preprocessing; no tensors


def test_unknown_backbone_exits_2_with_suggestion(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", "efficientnet-lite3"]) == 2
    err = capsys.readouterr().err
    assert "unknown backbone 'efficientnet-lite3'" in err and "did you mean" in err and "Traceback" not in err


def test_demo_prints_a_retrieval_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["demo", "--zero-shot", "--limit", "48"]) == 0
    out = capsys.readouterr().out
    assert "image → text" in out and "text → image" in out and "not contrastively trained" in out
    row = next(line for line in out.splitlines() if line.startswith("image → text")).split()
    r1, r5, r10 = (float(v) for v in row[3:6])
    assert 0 <= r1 <= r5 <= r10 <= 100 and r10 > 100 * 10 / 48  # better than chance on 48 pairs


def test_train_then_eval_round_trip(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.data.test_catalog import write_pairs

    pairs = str(write_pairs(tmp_path / "data", n=30))
    out = tmp_path / "adapter"
    args = ["--backbone", f"hf-clip:{tiny_clip_dir}", "--data", pairs, "--json"]
    assert main(["train", *args, "--method", "dga", "--out", str(out), "--max-steps", "3", "--batch-size", "4"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["steps"] == 3 and trained["trainable_parameters"] > 0
    assert (out / "adapter_config.json").is_file() and not (out / "checkpoint.pt").exists()
    assert main(["eval", *args, "--adapter", str(out), "--split", "test"]) == 0  # the fifth train held out
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test"] == trained["test"]
    with pytest.raises(SystemExit) as exit_info:  # argparse refuses an unknown method, listing the choices
        main(["train", *args, "--method", "lgaa", "--out", str(out)])
    assert exit_info.value.code == 2 and "invalid choice: 'lgaa'" in capsys.readouterr().err
