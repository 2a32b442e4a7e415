"""Tasks on real data through the real bridge: evaluation is sane and a few steps help."""

from __future__ import annotations

import torch

from graytune.data.catalog import load_splits
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task, open_for
from graytune.train.trainer import TrainConfig, fit

BRIDGE = "bridge:efficientnet-lite0+minilm"


def test_base_to_novel_scores_each_group_among_its_own_classes() -> None:
    splits = load_splits("fashion-mnist:base-to-novel")
    handle = open_for(BRIDGE, "black-box", "zero-shot")
    small = splits.test.subset(list(range(200)))
    task = make_task(splits.__class__(**{**splits.__dict__, "train": splits.train.subset(list(range(20)))}),
                     handle, 64)
    m = task.evaluate(AdaptedModel.build(handle, "zero-shot"), small)
    assert {"accuracy", "base_accuracy", "novel_accuracy", "harmonic_mean"} <= set(m)
    b, n = m["base_accuracy"], m["novel_accuracy"]
    assert m["harmonic_mean"] == (2 * b * n / (b + n) if b + n else 0.0)
    assert b > 0.2 or n > 0.2  # better than chance among 5 classes in at least one group


def test_sketch_task_trains_and_reports_category_metrics() -> None:
    splits = load_splits("tuxpaint-sketch")
    handle = open_for(BRIDGE, "dark-gray", "output")
    small = splits.__class__(**{**splits.__dict__, "train": splits.train.subset(list(range(64))),
                                "val": splits.val.subset(list(range(32)))})
    task = make_task(small, handle, 64)
    model = AdaptedModel.build(handle, "output")
    metrics = task.evaluate(model, small.val)
    assert {"mAP", "P@1", "P@10", "sketch_recall@1"} <= set(metrics)
    assert all(0 <= v <= 1 for v in metrics.values())  # 0–1, as CLIP_benchmark
    batch = next(task.batches(16, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        before = float(task.loss(model, batch))
    fit(model, task, small.val, TrainConfig(lr=1e-3, batch_size=16, max_steps=8), progress=False)
    with torch.no_grad():
        assert float(task.loss(model, batch)) < before  # the contrastive loss falls on training data
