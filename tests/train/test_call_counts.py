"""Calls counted both ways: per tower forward (what the boundary meters, what ``--max-calls`` bounds) and per model
evaluation (ZIP's and BlackVIP's count: one loss on one batch, both towers included)."""

from __future__ import annotations

import json

import pytest
import torch

from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.runs import read_history_lines
from graytune.train.budget import CALL_UNITS
from graytune.train.checkpoint import STATE
from graytune.train.tasks import ClassificationTask
from graytune.train.trainer import TrainConfig, calls_curve, fit
from tests.train.test_trainer import Interrupt, StopAfter, toy_texts
from tests.train.test_zeroth import zo_model


def test_a_two_tower_run_counts_model_evaluations_as_half_its_tower_calls(  # type: ignore[no-untyped-def]
        tiny_clip_dir, tmp_path, capsys) -> None:
    """Images and captions through a CLIP-like model: each loss evaluation is one forward per tower."""
    from graytune.cli.main import main
    from tests.data.test_catalog import write_pairs

    out = tmp_path / "zo"
    assert main(["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(write_pairs(tmp_path / "d", 30)),
                 "--batch-size", "4", "--method", "dga-zo", "--out", str(out), "--zo", "spsa", "--zo-q", "2",
                 "--max-steps", "3", "--eval-every", "3", "--json"]) == 0
    calls = json.loads(capsys.readouterr().out)["calls"]
    assert calls["train_evaluations"] == 3 * 2 * 2  # steps × q × the two evaluations of a direction
    assert calls["train"] == 2 * calls["train_evaluations"] == 24  # two towers (images, captions) each
    lines = read_history_lines(out)
    assert lines[0]["calls_counted"] == CALL_UNITS  # the first line says what each count counts
    steps = [r for r in lines if r.get("event") == "step"]
    assert [(r["train_calls"], r["train_evaluations"]) for r in steps] == [(8, 4), (16, 8), (24, 12)]
    assert calls_curve(out) == [(24, calls_curve(out)[0][1])]
    assert calls_curve(out, per="evaluation") == [(12, calls_curve(out)[0][1])]
    assert main(["train", "--backbone", f"hf-clip:{tiny_clip_dir}", "--data", str(tmp_path / "d" / "pairs.csv"),
                 "--batch-size", "4", "--method", "dga-zo", "--out", str(tmp_path / "zo2"), "--zo", "spsa",
                 "--zo-q", "2", "--max-steps", "3", "--eval-every", "3"]) == 0
    said = capsys.readouterr().out
    assert "forward calls, one per tower forward: 24 training" in said
    assert "training model evaluations (ZIP's and BlackVIP's calls): 12" in said


def test_backprop_counts_one_evaluation_per_batch(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    model = AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga"), "dga")
    result = fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
                 TrainConfig(lr=1e-2, batch_size=4, max_steps=3, grad_accum=2), progress=False)
    assert result.calls["train_evaluations"] == 3 * 2  # steps × grad_accum
    assert result.calls["train"] == 2 * result.calls["train_evaluations"]  # class prompts and queries
    assert result.history[-1]["train_evaluations"] == 6 and result.history[-1]["train_calls"] == 12


def test_max_calls_still_bounds_tower_calls(tiny_clip_dir) -> None:  # type: ignore[no-untyped-def]
    """--max-calls keeps its meaning (tower calls): 30 pays for 2 steps of 12, i.e. 12 model evaluations."""
    result = fit(zo_model(tiny_clip_dir), ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1),
                 TrainConfig(lr=1e-2, batch_size=4, max_steps=10, zo="spsa", zo_q=3, max_calls=30), progress=False)
    assert result.stopped == "max_calls" and result.steps == 2
    assert result.calls["train"] == 24 and result.calls["train_evaluations"] == 12


@pytest.mark.parametrize("estimator", ["spsa", None])
def test_a_checkpoint_from_before_evaluations_were_counted_resumes_with_them_restored(  # type: ignore[no-untyped-def]
        tiny_clip_dir, tmp_path, estimator) -> None:
    level, method = ("black-box", "dga-zo") if estimator else ("dark-gray", "dga")
    config = TrainConfig(lr=1e-2, batch_size=4, max_steps=4, eval_every=2, zo=estimator, zo_q=2 if estimator else None)
    per_step = 4 if estimator else 1  # loss evaluations a step: 2q, or one backprop

    def model() -> AdaptedModel:
        return AdaptedModel.build(open_for(f"hf-clip:{tiny_clip_dir}", level, method), method)

    whole = fit(model(), ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config, progress=False)
    assert whole.calls["train_evaluations"] == 4 * per_step
    ckpt = tmp_path / "checkpoint.pt"
    with pytest.raises(Interrupt):  # dies in step 3, after the checkpoint of step 2
        fit(model(), StopAfter(ClassificationTask(toy_texts(), "a {}"), 2 * per_step + 1), toy_texts(8, seed=1),
            config, checkpoint=ckpt, progress=False)
    payload = torch.load(ckpt, weights_only=True)
    assert payload[STATE]["step"] == 2 and payload[STATE]["calls"]["train_evaluations"] == 2 * per_step
    del payload[STATE]["calls"]["train_evaluations"]  # as a checkpoint written before they were counted
    torch.save(payload, ckpt)
    resumed = fit(model(), ClassificationTask(toy_texts(), "a {}"), toy_texts(8, seed=1), config, checkpoint=ckpt,
                  progress=False)
    assert resumed.calls["train_evaluations"] == whole.calls["train_evaluations"]
    assert resumed.calls["train"] == whole.calls["train"]
