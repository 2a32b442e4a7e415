"""--out never loses a user's files; checkpoints make interrupted runs resume; damaged files say what to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from graytune import ArtifactError, InvalidInputError
from graytune.cli.main import main
from graytune.train.trainer import TrainConfig, fit
from tests.data.test_catalog import write_pairs


@pytest.fixture
def base(tiny_clip_dir, tmp_path) -> list[str]:  # type: ignore[no-untyped-def]
    pairs = write_pairs(tmp_path / "data", n=30)
    return ["--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(pairs), "--method", "output", "--json",
            "--max-steps", "2", "--batch-size", "4"]


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_out_refuses_folders_it_could_harm(base, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("do not lose me")
    assert main(["train", *base, "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert "not a graytune run (ideas.txt)" in err and "--overwrite" in err
    data = tmp_path / "data"
    before = listing(data)
    assert main(["train", *base, "--out", str(data)]) == 2  # the data set's own folder
    capsys.readouterr()
    assert listing(data) == before
    assert main(["train", *base, "--out", str(notes), "--overwrite"]) == 0  # written beside, nothing deleted
    capsys.readouterr()
    assert (notes / "ideas.txt").read_text() == "do not lose me" and (notes / "adapter_config.json").is_file()
    assert (notes / "history.jsonl").is_file() and not (notes / "checkpoint.pt").exists()


def test_a_finished_adapter_needs_overwrite_and_out_dot_works(base, tmp_path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    assert main(["train", *base, "--out", "."]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (run / "adapter_config.json").is_file()
    assert [h["step"] for h in first["history"]] and first["best_step"] >= 1  # --json carries the validation history
    events = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2]
    assert any(e["event"] == "val" and 0.0 <= e["metrics"]["mean_recall"] for e in events)
    weights = (run / "adapter_model.safetensors").read_bytes()
    assert main(["train", *base, "--out", ".", "--seed", "1"]) == 2
    assert "already holds a finished 'output' adapter" in capsys.readouterr().err
    assert (run / "adapter_model.safetensors").read_bytes() == weights
    assert main(["train", *base, "--out", ".", "--seed", "1", "--overwrite"]) == 0
    capsys.readouterr()
    assert (run / "adapter_model.safetensors").read_bytes() != weights


def test_ctrl_c_and_periodic_checkpoints_resume_exactly(tiny_clip_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.train.test_trainer import StopAfter, assert_same, params, setup

    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=8, eval_every=100, seed=3, checkpoint_every="1000")
    model, task, val = setup(tiny_clip_dir)
    fit(model, task, val, config, progress=False)
    reference = params(model)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    model, task, val = setup(tiny_clip_dir)
    with pytest.raises(KeyboardInterrupt):
        fit(model, StopAfter(task, 5, KeyboardInterrupt), val, config, checkpoint=ckpt, progress=False)  # Ctrl-C in step 6
    assert torch.load(ckpt, weights_only=True)["state"]["step"] == 5  # every whole step kept, none half
    model, task, val = setup(tiny_clip_dir)
    fit(model, task, val, config, checkpoint=ckpt, progress=False)
    assert_same(params(model), reference)

    every = TrainConfig(lr=1e-2, batch_size=4, max_steps=8, eval_every=100, seed=3, checkpoint_every="3")
    other = tmp_path / "other" / "checkpoint.pt"
    model, task, val = setup(tiny_clip_dir)
    with pytest.raises(RuntimeError):
        fit(model, StopAfter(task, 7, RuntimeError), val, every, checkpoint=other, progress=False)  # a crash, not Ctrl-C
    assert torch.load(other, weights_only=True)["state"]["step"] == 6  # the last periodic checkpoint
    model, task, val = setup(tiny_clip_dir)
    with pytest.raises(InvalidInputError, match="other settings: lr 0.01 then, 0.02 now"):
        fit(model, task, val, TrainConfig(**{**every.__dict__, "lr": 2e-2}), checkpoint=other, progress=False)
    other.write_bytes(other.read_bytes()[:200])  # truncated
    with pytest.raises(InvalidInputError, match="damaged or truncated.*delete it to start the run over"):
        fit(model, task, val, every, checkpoint=other, progress=False)


def test_truncated_or_swapped_artifact_files_are_reported(base, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from graytune.artifacts import read_weights

    out = tmp_path / "a"
    assert main(["train", *base, "--out", str(out)]) == 0
    capsys.readouterr()
    weights = out / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError, match="damaged or truncated"):
        read_weights(out)
    weights.write_bytes(good[:-4] + bytes(4))  # same size, other bytes: not the file the config was written with
    with pytest.raises(ArtifactError, match="SHA-256 differs"):
        read_weights(out)
