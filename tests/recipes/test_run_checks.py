"""A run trains on what it says it trains on (issue 28 items 1, 2 and 12): --data with --train is refused,
a resumed run checks its data, task and options before any training, and the header and artifact say how
big each split is and which files made them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graytune.cli.main import main
from graytune.train import checkpoint as ckpt_keys
from graytune.train.loop import _Run
from tests.data.test_catalog import write_pairs


def stop_at(monkeypatch, step: int, error: BaseException) -> None:  # type: ignore[no-untyped-def]
    """Make the next ``fit`` raise ``error`` right after training step ``step`` (as Ctrl-C there would)."""
    original = _Run.log_step

    def log_step(self, loss, lr):  # type: ignore[no-untyped-def]
        original(self, loss, lr)
        if self.state.step == step:
            raise error

    monkeypatch.setattr(_Run, "log_step", log_step)


@pytest.fixture
def flags(tiny_clip_dir, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    return ["--backbone", f"hf-clip:{tiny_clip_dir}", "--method", "dga", "--max-steps", "4", "--batch-size", "4",
            "--lr", "0.01"]


def interrupted_run(monkeypatch, flags: list[str], data: list[str], out: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    with monkeypatch.context() as m:
        stop_at(m, 2, KeyboardInterrupt())
        assert main(["train", *flags, *data, "--out", str(out)]) == 130
    assert "checkpoint saved" in capsys.readouterr().err and (out / "checkpoint.pt").is_file()


def test_data_and_train_together_are_refused(flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    assert main(["train", *flags, "--data", pairs, "--train", pairs, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"--data {pairs} and --train {pairs} both name the data" in err and "not both" in err
    assert not (tmp_path / "o").exists()


def test_a_resume_refuses_other_data_or_options_naming_them(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = write_pairs(tmp_path / "d", n=30)
    other = write_pairs(tmp_path / "e", n=40)
    out = tmp_path / "run"
    interrupted_run(monkeypatch, flags, ["--data", str(pairs)], out, capsys)
    written = (out / "checkpoint.pt").read_bytes()

    assert main(["train", *flags, "--data", str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"other settings: data {pairs} then, {other} now" in err and "delete the checkpoint" in err

    assert main(["train", *flags, "--data", str(pairs), "--option", "extra_tokens=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "option dga-text.extra_tokens 1 then, 2 now" in err and "size mismatch" not in err

    pairs.write_text(pairs.read_text().replace("number 3", "number three"))  # the same name, other content
    assert main(["train", *flags, "--data", str(pairs), "--out", str(out)]) == 2
    assert f"sha256 of {pairs} " in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == written  # refused before any training: nothing rewritten


def test_a_checkpoint_from_before_data_was_recorded_still_resumes(monkeypatch, flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    out = tmp_path / "run"
    interrupted_run(monkeypatch, flags, ["--data", pairs], out, capsys)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    del payload[ckpt_keys.RUN]  # as written by graytune before data and options were recorded
    torch.save(payload, out / "checkpoint.pt")
    assert main(["train", *flags, "--data", pairs, "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    with monkeypatch.context() as m:  # an old checkpoint with other options: a clear refusal, not a traceback
        interrupted_run(m, flags, ["--data", pairs], tmp_path / "again", capsys)
    payload = torch.load(tmp_path / "again" / "checkpoint.pt", weights_only=True)
    del payload[ckpt_keys.RUN]
    torch.save(payload, tmp_path / "again" / "checkpoint.pt")
    assert main(["train", *flags, "--data", pairs, "--option", "extra_tokens=2", "--out",
                 str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert "adapters of other shapes" in err and "other --option values" in err and "Traceback" not in err


def test_the_header_and_artifact_say_each_split_size_and_the_files(flags, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    pairs = str(write_pairs(tmp_path / "d", n=30))
    assert main(["train", *flags, "--data", pairs, "--out", str(tmp_path / "a"), "--max-steps", "1"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dga on"))
    assert f"{pairs} (train 21 / val 3 / test 6 items):" in header
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["split_sizes"] == {"train": 21, "val": 3, "test": 6} and saved["data"] == pairs

    train, test = str(write_pairs(tmp_path / "t", n=20)), str(write_pairs(tmp_path / "u", n=12))
    assert main(["train", *flags, "--train", train, "--test", test, "--out", str(tmp_path / "b"),
                 "--max-steps", "1"]) == 0
    assert f"train {train}, test {test} (train 18 / val 2 / test 12 items):" in capsys.readouterr().out
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert saved["data"] == f"train {train}, test {test}" and saved["data_files"] == {"train": train, "test": test}
    assert saved["split_sizes"] == {"train": 18, "val": 2, "test": 12}
