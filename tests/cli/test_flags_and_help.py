"""Every subcommand and option says what it does; --version; flags that would do nothing on texts are refused;
graytune eval takes the adapter's backbone; graytune methods lists shared keys as ADAPTER.KEY."""

from __future__ import annotations

import argparse
import json

import pytest

from graytune.cli.main import build_parser, main

#: Owned elsewhere (its options come from ServeConfig's docs, checked there).
NOT_CHECKED = {"serve"}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_subcommand_and_option_has_help() -> None:
    problems = []
    for name, parser in _subparsers().items():
        if name in NOT_CHECKED:
            continue
        if not (parser.description or "").strip():
            problems.append(f"{name}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            text = action.help or ""
            if not text.strip():
                problems.append(f"{name} {flag}: no help")
            for bad in ("(default: )", "(default: None)", "None:", "as before", "before it followed"):
                if bad in text:
                    problems.append(f"{name} {flag}: {bad!r} in {text!r}")
    assert not problems, "\n".join(problems)


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    from graytune.artifact_files import library_version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"graytune {library_version()}\n"


@pytest.mark.parametrize("flags", [["--image-size", "64"], ["--workers", "2"], ["--cache-mb", "1"],
                                   ["--image-size", "64", "--workers", "2"]])
def test_image_flags_on_texts_are_refused_in_train_and_eval(flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    train = ["train", "--backbone", "minilm", "--method", "output", "--data", "wordnet-supersense",
             "--out", str(tmp_path / "out"), "--max-steps", "1", *flags]
    assert main(train) == 2
    err = capsys.readouterr().err
    assert f"{flags[0]}" in err and "wordnet-supersense holds texts only" in err and "drop" in err
    assert not (tmp_path / "out").exists()  # refused before anything was made
    assert main(["eval", "--backbone", "minilm", "--data", "fortunes:base-to-novel", *flags]) == 2
    assert "holds texts only" in capsys.readouterr().err
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text('{"prompt": "2+2=", "completion": " 4"}\n')
    assert main(["train", "--backbone", "smollm2-135m", "--method", "prompt", "--train", str(prompts),
                 "--out", str(tmp_path / "lm"), *flags]) == 2
    assert f"{prompts} holds texts only" in capsys.readouterr().err
    for name, rows in (("texts.csv", "text,label\na cat,animal\n"), ("texts.jsonl", '{"text": "a cat", "label": "x"}\n')):
        (tmp_path / name).write_text(rows)  # text,label rows: texts only too
        assert main(["train", "--backbone", "minilm", "--method", "dga", "--train", str(tmp_path / name),
                     "--out", str(tmp_path / "t"), *flags]) == 2
        assert f"{tmp_path / name} holds texts only" in capsys.readouterr().err


def test_methods_lists_a_shared_key_as_adapter_key(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["methods", "dga", "lga-id"]) == 0
    out = capsys.readouterr().out
    assert "--option dga-pixel.zeroth_order=False" in out and "--option dga-text.zeroth_order=False" in out
    assert "--option zeroth_order=" not in out  # the bare key is refused as ambiguous: never listed
    assert "--option lga.gate=scalar" in out and "--option dga-text.gate=scalar" in out
    assert "--option kernel=3" in out  # a key one adapter has stays bare


def test_eval_takes_the_adapters_backbone(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tests.data.test_catalog import write_pairs

    pairs = str(write_pairs(tmp_path / "data", n=20))
    backbone = f"hf-clip:{tiny_clip_dir}"
    assert main(["train", "--backbone", backbone, "--method", "output", "--data", pairs, "--out",
                 str(tmp_path / "a"), "--max-steps", "1", "--batch-size", "4", "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert main(["eval", "--adapter", str(tmp_path / "a"), "--data", pairs, "--split", "test", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["backbone"] == backbone and scored["test"] == trained["test"]
    assert main(["eval", "--data", pairs]) == 2  # zero-shot names its backbone
    assert "give --backbone" in capsys.readouterr().err
