"""The trainer: deterministic, exact resume, accumulation, early stopping on validation."""

from __future__ import annotations

import pytest
import torch

from graytune import InvalidInputError
from graytune.data.labeled import LabeledTexts
from graytune.model import AdaptedModel
from graytune.recipes.run import open_for
from graytune.train.tasks import ClassificationTask
from graytune.train.trainer import TrainConfig, fit

WORDS = ["cat", "dog", "car", "bus", "red", "sky", "sea", "tree", "rock", "rain", "snow", "fish"]


def toy_texts(n: int = 24, seed: int = 0) -> LabeledTexts:
    g = torch.Generator().manual_seed(seed)
    texts = tuple(" ".join(WORDS[int(i)] for i in torch.randint(0, 12, (3,), generator=g)) for _ in range(n))
    return LabeledTexts("toy", texts, torch.randint(0, 3, (n,), generator=g), ("animal", "vehicle", "weather"))


def setup(tiny_clip_dir):  # type: ignore[no-untyped-def]
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "dga")
    return AdaptedModel.build(handle, "dga"), ClassificationTask(toy_texts(), "a {}"), toy_texts(12, seed=1)


def params(model: AdaptedModel) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


CONFIG = TrainConfig(lr=1e-2, batch_size=4, max_steps=8, eval_every=2, seed=3)


def test_two_runs_with_one_seed_are_identical(tiny_clip_dir) -> None:
    runs = []
    for _ in range(2):
        model, task, val = setup(tiny_clip_dir)
        fit(model, task, val, CONFIG, progress=False)
        runs.append(params(model))
    assert_same(*runs)


class Interrupt(Exception):
    pass


class StopAfter:
    """Wraps a task and raises ``error`` after ``n`` loss calls: a run killed (or Ctrl-C'd) mid-way."""

    def __init__(self, task: ClassificationTask, n: int, error: type[BaseException] = Interrupt) -> None:
        self.task, self.n, self.primary, self.error = task, n, task.primary, error

    def __len__(self) -> int:
        return len(self.task)

    def batches(self, *args):  # type: ignore[no-untyped-def]
        return self.task.batches(*args)

    def evaluate(self, *args):  # type: ignore[no-untyped-def]
        return self.task.evaluate(*args)

    def loss(self, model, batch):  # type: ignore[no-untyped-def]
        self.n -= 1
        if self.n < 0:
            raise self.error
        return self.task.loss(model, batch)


def test_resume_equals_uninterrupted_training(tiny_clip_dir, tmp_path) -> None:
    model, task, val = setup(tiny_clip_dir)
    whole = fit(model, task, val, CONFIG, progress=False)
    reference = params(model)

    ckpt = tmp_path / "ckpt.pt"
    model, task, val = setup(tiny_clip_dir)
    with pytest.raises(Interrupt):
        fit(model, StopAfter(task, 7), val, CONFIG, checkpoint=ckpt, progress=False)  # dies in step 8
    assert ckpt.is_file() and not (tmp_path / "ckpt.pt.tmp").exists()
    model, task, val = setup(tiny_clip_dir)  # a fresh process would start like this
    resumed = fit(model, task, val, CONFIG, checkpoint=ckpt, progress=False)
    assert resumed.steps == whole.steps == 8
    assert [h["step"] for h in resumed.history] == [h["step"] for h in whole.history]
    assert_same(params(model), reference)


def test_accumulation_matches_one_big_batch(tiny_clip_dir) -> None:
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        model, task, val = setup(tiny_clip_dir)
        fit(model, task, val, TrainConfig(lr=1e-2, batch_size=batch, grad_accum=accum, max_steps=2, seed=5),
            progress=False)
        results.append(params(model))
    assert_same(*results)


def test_early_stopping_and_best_state(tiny_clip_dir) -> None:
    model, task, val = setup(tiny_clip_dir)
    result = fit(model, task, val, TrainConfig(lr=0.0, batch_size=4, max_steps=50, eval_every=2, patience=2),
                 progress=False)
    assert result.steps == 6 and len(result.history) == 3  # no improvement after the first validation
    assert result.best_step == 2


def test_nothing_to_train_is_a_clear_error(tiny_clip_dir) -> None:
    handle = open_for(f"hf-clip:{tiny_clip_dir}", "dark-gray", "zero-shot")
    model = AdaptedModel.build(handle, "zero-shot")
    model.logit_scale.requires_grad_(False)
    with pytest.raises(InvalidInputError, match="nothing to train"):
        fit(model, ClassificationTask(toy_texts(), "a {}"), toy_texts(4), CONFIG, progress=False)
