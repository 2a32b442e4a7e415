"""``graytune audit`` writes its JSON and figure, and refuses bad input before anything loads."""

from __future__ import annotations

import json

import pytest

from graytune.cli.main import main


def test_writes_json_and_png(tiny_clip, tmp_path, capsys) -> None:
    out = tmp_path / "audit"
    args = ["audit", tiny_clip, "--access", "black-box", "--budget", "2", "--rows", "8", "--probe-train", "60",
            "--probe-test", "40", "--steps-per-call", "1", "--out", str(out), "--no-progress"]
    assert main([*args, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["data"]["name"] == "fashion-mnist" and printed["modality"] == "image"
    assert printed["levels"]["black-box"]["extraction"]["outputs"]["spent"]["calls"] == 2
    assert json.loads((out / "audit.json").read_text())["budget"] == 2
    assert (out / "audit.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(args) == 2  # the files exist
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "black-box:" in text and "recommended for a key at this level:" in text
    assert "why: black-box sells outputs" in text and "finite differences:" in text and "wrote" in text


@pytest.mark.parametrize(("extra", "message"), [
    (["--budget", "0"], "--budget is 0; give a whole number from 1 to 100,000"),
    (["--budget", "1000001"], "--budget is 1000001"),
    (["--budget", "5", "--rows", "0", "--probe-test", "5"], "--probe-test is 5"),
    (["--budget", "5", "--data", "wordnet-supersense"], "it is a text set and this audit attacks the image tower"),
    (["--budget", "5", "--reads", "text.token_embeds"], "read at text.token_embeds needs access level dark-gray"),
])
def test_refuses_bad_input_clearly(tiny_clip, tmp_path, capsys, extra, message) -> None:
    assert main(["audit", tiny_clip, "--access", "black-box", "--out", str(tmp_path / "x"), "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_argparse_refuses_white_box(tiny_clip, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["audit", tiny_clip, "--access", "white-box", "--budget", "5"])
    assert "invalid choice: 'white-box'" in capsys.readouterr().err


def test_attacks_can_be_chosen(tiny_clip, tmp_path, capsys) -> None:
    args = ["audit", tiny_clip, "--access", "black-box", "dark-gray", "--budget", "2", "--rows", "8", "--probe-train",
            "40", "--probe-test", "40", "--steps-per-call", "1", "--attacks", "outputs", "vjp", "--geometry-calls", "3",
            "--out", str(tmp_path / "audit"), "--no-progress", "--json"]
    assert main(args) == 0
    levels = json.loads(capsys.readouterr().out)["levels"]
    assert list(levels["black-box"]["extraction"]) == ["outputs"] and list(levels["dark-gray"]["extraction"]) == ["vjp"]
    assert levels["black-box"]["finite_differences"]["spent"]["vjps"] == 0  # the Jacobian attacks always run
    with pytest.raises(SystemExit):
        main([*args[:-1], "--attacks", "gradients"])
    assert "invalid choice: 'gradients'" in capsys.readouterr().err
