"""How training went is kept: history.jsonl beside the adapter, TensorBoard events with --log tensorboard."""

from __future__ import annotations

import json

from graytune.cli.main import main
from tests.data.test_catalog import write_pairs


def test_tensorboard_events_mirror_the_history(tiny_clip_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(write_pairs(tmp_path / "d", 30)),
                 "--method", "output", "--out", str(out), "--max-steps", "3", "--batch-size", "4",
                 "--eval-every", "2", "--log", "tensorboard", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    events = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "val"]
    assert [e["step"] for e in steps] == [1, 2, 3] and [e["step"] for e in vals] == [2, 3]
    assert all(e["lr"] > 0 and e["samples_per_s"] > 0 and e["forward_queries"] > 0 for e in steps)
    assert [h["step"] for h in summary["history"]] == [2, 3] and summary["best_step"] in (2, 3)
    board = EventAccumulator(str(out / "tensorboard"))
    board.Reload()
    losses = [s.value for s in board.Scalars("train/loss")]
    assert len(losses) == 3 and all(abs(a - e["loss"]) < 1e-5 for a, e in zip(losses, steps))
    assert [s.step for s in board.Scalars("val/mean_recall")] == [2, 3]
