"""history.jsonl holds one run's lines (issue 28 item 7): a resumed run cuts it back to the checkpoint's step,
a new run starts it afresh, and a file of that name that graytune did not write is never touched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graytune.cli.main import main
from graytune.eval.plots import read_history
from graytune.runs import calls_curve, read_history_lines
from tests.data.test_catalog import write_pairs
from tests.recipes.test_run_checks import stop_at


@pytest.fixture
def flags(tiny_clip_dir, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    return ["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--method", "output", "--data", pairs,
            "--max-steps", "6", "--batch-size", "4", "--checkpoint-every", "2", "--eval-every", "3"]


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def steps(out: Path) -> list[int]:
    return [r["step"] for r in lines(out) if r["event"] == "step"]


def crashed(monkeypatch, flags: list[str], out: Path) -> None:  # type: ignore[no-untyped-def]
    """A run that crashed in step 3 (the last checkpoint: step 2), its history holding steps 1..3."""
    with monkeypatch.context() as m:
        stop_at(m, 3, RuntimeError("the machine went down"))
        with pytest.raises(RuntimeError):
            main([*flags, "--out", str(out)])
    assert steps(out) == [1, 2, 3]


def test_a_resumed_run_cuts_its_history_back_to_the_checkpoint(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    crashed(monkeypatch, flags, out)
    capsys.readouterr()
    assert main([*flags, "--out", str(out)]) == 0
    assert "resuming from step 2 of 6: " in capsys.readouterr().err  # said, not only seen in the bar's start
    assert steps(out) == [1, 2, 3, 4, 5, 6]  # not 1, 2, 3, 3, 4, 5, 6
    history = lines(out)
    assert history[0]["event"] == "run" and history[0]["graytune"] and history[0]["method"] == "output"
    assert [r["step"] for r in history if r["event"] == "resume"] == [2]
    assert [r["step"] for r in history if r["event"] == "val"] == [3, 6]
    assert read_history(out).steps == [1, 2, 3, 4, 5, 6] and len(calls_curve(out)) == 2
    assert read_history_lines(out) == history


def test_a_new_run_starts_its_history_afresh(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    crashed(monkeypatch, flags, out)
    (out / "checkpoint.pt").unlink()  # nothing to resume: a new run
    assert main([*flags, "--out", str(out), "--max-steps", "2"]) == 0
    capsys.readouterr()
    assert steps(out) == [1, 2] and sum(r["event"] == "run" for r in lines(out)) == 1


def test_a_history_from_an_earlier_graytune_is_kept_and_marked(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    crashed(monkeypatch, flags, out)
    old = [r for r in lines(out) if r["event"] != "run"]  # as graytune wrote it before the first line existed
    (out / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    assert main([*flags, "--out", str(out)]) == 0
    capsys.readouterr()
    assert lines(out)[0]["event"] == "run" and steps(out) == [1, 2, 3, 4, 5, 6]


def test_a_history_graytune_did_not_write_is_never_touched(flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "history.jsonl").write_text('{"epoch": 1, "my_loss": 0.3}\n')
    for extra in ([], ["--overwrite"]):
        assert main([*flags, "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{out / 'history.jsonl'} was not written by graytune" in err and "move it away" in err
    assert (out / "history.jsonl").read_text() == '{"epoch": 1, "my_loss": 0.3}\n'
    assert sorted(p.name for p in out.iterdir()) == ["history.jsonl"]
