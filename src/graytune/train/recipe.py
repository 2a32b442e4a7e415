"""One training run end to end: open the backbone, build the method, fit, test once, save the artifact.

Shared by ``graytune train``/``graytune eval`` and the demo.

Example:
    >>> result = train_and_save(RunSpec("minilm", "dark-gray", "dga", "wordnet-supersense", out="out/dga"))
    >>> result["test"]["accuracy"]
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graytune.access import Handle, open_backbone
from graytune.artifacts import load_adapter, read_config, save_adapter
from graytune.data.catalog import Splits, load_splits
from graytune.data.images import ImagePreprocess
from graytune.data.labeled import LabeledImageFiles, LabeledImages
from graytune.model import METHODS, AdaptedModel
from graytune.train.tasks import ClassificationTask, RetrievalTask, SketchRetrievalTask, Task
from graytune.train.trainer import TrainConfig, fit, seed_everything
from graytune.types import AccessLevel


@dataclass
class RunSpec:
    """What to train, where, and how."""

    backbone: str
    access: str
    method: str
    data: str
    task: str | None = None
    out: str | None = None
    image_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)


def open_for(backbone: str, access: str, method: str) -> Handle:
    """Open ``backbone`` at ``access``, granting the reads ``method`` needs (the owner's explicit grant)."""
    reads = ("text.token_embeds",) if method == "adalink" else ()
    return open_backbone(backbone, access=access, reads=reads)


def make_task(splits: Splits, handle: Handle, image_size: int | None) -> Task:
    needs_images = splits.task in ("retrieval", "sketch") or isinstance(splits.train, LabeledImages | LabeledImageFiles)
    pre = ImagePreprocess.from_spec(handle.spec, image_size, fit=splits.fit) if needs_images else None
    if splits.task == "retrieval":
        return RetrievalTask(splits.train, pre)  # type: ignore[arg-type]
    if splits.task == "sketch":
        return SketchRetrievalTask(splits.train, pre)  # type: ignore[arg-type]
    return ClassificationTask(splits.train, splits.prompt, pre, splits.classes, splits.eval_splits)


def train_and_save(run: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Train, select on val, evaluate once on test; save to ``run.out`` when given. Returns a summary."""
    seed_everything(run.train.seed)
    handle = open_for(run.backbone, run.access, run.method)
    splits = load_splits(run.data, run.task)
    task = make_task(splits, handle, run.image_size)
    model = AdaptedModel.build(handle, run.method)
    result = None
    if METHODS[run.method].adapters or METHODS[run.method].whitebox:
        ckpt = Path(run.out) / "checkpoint.pt" if run.out else None
        result = fit(model, task, splits.val, run.train, checkpoint=ckpt, progress=progress)
    start = time.perf_counter()
    test = task.evaluate(model, splits.test)
    summary = {
        "backbone": handle.spec.id, "access": handle.access.label, "method": run.method, "data": run.data,
        "task": splits.task, "trainable_parameters": model.trainable_parameters() if result else 0,
        "steps": result.steps if result else 0, "best_val": result.best_metric if result else None,
        "train_seconds": result.seconds if result else 0.0, "step_seconds": result.step_seconds if result else 0.0,
        "test_seconds": time.perf_counter() - start, "test": test, "history": result.history if result else [],
    }
    if run.out:
        save_adapter(model, run.out, extra={"train": asdict(run.train), "data": run.data, "task": splits.task,
                                            "image_size": run.image_size, "metrics": {"test": test}})
    return summary


def evaluate_saved(backbone: str, adapter: str | None, data: str, task: str | None = None,
                   image_size: int | None = None) -> dict[str, Any]:
    """Test metrics of a saved adapter (or the zero-shot backbone when ``adapter`` is None)."""
    config = read_config(adapter) if adapter else {"method": "zero-shot", "access": "black-box"}
    level = max(AccessLevel.parse(config["access"]), AccessLevel.BLACK_BOX)
    handle = open_for(backbone, level.label, config["method"])
    splits = load_splits(data, task)
    evaluator = make_task(splits, handle, image_size or config.get("image_size"))
    model = load_adapter(adapter, handle) if adapter else AdaptedModel.build(handle, "zero-shot")
    return {"backbone": handle.spec.id, "method": config["method"], "data": data,
            "test": evaluator.evaluate(model, splits.test)}
