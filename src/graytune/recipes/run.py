"""One training run end to end: open the backbone, build the method, fit, test once, save the artifact.

Shared by ``graytune train``/``graytune eval`` and the demo.

Example:
    >>> result = train_and_save(RunSpec("minilm", "dark-gray", "dga", "wordnet-supersense", out="out/dga"))
    >>> result["test"]["accuracy"]
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from graytune.access import Handle, open_backbone
from graytune.artifacts import load_adapter, prepare_out, read_config, save_adapter
from graytune.data.catalog import Splits, load_splits, load_whole
from graytune.data.stream import LoaderConfig
from graytune.data.images import ImagePreprocess
from graytune.data.labeled import LabeledImageFiles, LabeledImages
from graytune.devices import parse_device
from graytune.errors import ArtifactError, InvalidInputError
from graytune.methods import MethodKind, artifact_method, get_method
from graytune.model import AdaptedModel
from graytune.train.tasks import ClassificationTask, RetrievalTask, SketchRetrievalTask, Task
from graytune.train.trainer import TrainConfig, counted, fit, seed_everything, world_position, zeroth_order_for
from graytune.types import AccessLevel

log = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """What to train, where, and how.

    Attributes:
        access: the level to open the backbone at; None: the method's own (the least exposure).
        options: the method's options (``graytune methods``), e.g. ``{"rank": 4}``.
        adapter: an artifact of the same method and backbone to start from (warm start).
    """

    backbone: str
    access: str | None
    method: str
    data: str
    task: str | None = None
    out: str | None = None
    image_size: int | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    options: dict[str, Any] = field(default_factory=dict)
    adapter: str | None = None
    files: dict[str, str | None] = field(default_factory=dict)
    """Explicit split files instead of ``data``: ``{"train": …, "val": …, "test": …}``."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    retry_s: float | None = None
    """For a served backbone: how long the client keeps retrying a server that is down (default 120 s)."""
    tensorboard: bool = False
    """Also write TensorBoard events beside ``history.jsonl`` (needs the tensorboard package)."""
    overwrite: bool = False
    """Replace a finished adapter in ``out``, or write beside files that are not a graytune run."""
    device: str | None = None
    """Where the adapters run, and an in-process backbone with them (default: CUDA when present, else CPU)."""
    dtype: str | None = None
    """An in-process backbone's precision (fp32 default, bf16, fp16); adapters stay fp32."""
    recompute: bool = False
    """An in-process backbone recomputes its layers inside the backward (less memory, one more forward)."""


def open_for(backbone: str, access: str | None, method: str, retry_s: float | None = None,
             device: str | None = None, dtype: str | None = None, recompute: bool = False) -> Handle:
    """Open ``backbone`` at ``access`` (default: the method's level), granting the reads ``method`` needs.

    The reads are the ones the method needs on this backbone (AdaLink reads ``image.patch_embeds`` only
    where the backbone publishes it), so a method that reads is opened once to learn the spec.
    ``retry_s`` (served backbones only) is the client's retry budget while the server is down;
    ``device``, ``dtype`` and ``recompute`` place an in-process backbone (a server's owner chose its own).
    """
    spec = get_method(method)
    level = AccessLevel.parse(access) if access else spec.min_access
    if backbone.startswith(("http://", "https://")):
        extra: dict[str, Any] = {"retry_s": retry_s} if retry_s is not None else {}
    else:
        extra = {"device": device, "dtype": dtype, "recompute": recompute}
    handle = open_backbone(backbone, access=level, **extra)
    reads = spec.reads_on(handle.spec)
    return open_backbone(backbone, access=level, reads=reads, **extra) if reads else handle


def place_model(model: AdaptedModel, device: str | None) -> AdaptedModel:
    """``model`` on the client's device: ``device`` when given, else where the handle puts results."""
    return model.to(parse_device(device)) if device is not None else model


def make_task(splits: Splits, handle: Handle, image_size: int | None, fit: str | None = None,
              loader: LoaderConfig | None = None) -> Task:
    needs_images = splits.task in ("retrieval", "sketch") or isinstance(splits.train, LabeledImages | LabeledImageFiles)
    pre = ImagePreprocess.from_spec(handle.spec, image_size, fit=fit or splits.fit) if needs_images else None
    if splits.task == "retrieval":
        return RetrievalTask(splits.train, pre, loader)  # type: ignore[arg-type]
    if splits.task == "sketch":
        return SketchRetrievalTask(splits.train, pre, loader)  # type: ignore[arg-type]
    return ClassificationTask(splits.train, splits.prompt, pre, splits.classes, splits.eval_splits, loader)


def splits_for(run: RunSpec) -> Splits:
    """The run's data: ``run.data``, or its explicit split files."""
    files = {k: v for k, v in run.files.items() if v}
    return load_splits(None if files else run.data, run.task, **files)


def describe(splits: Splits, task: Task, run_data: str) -> dict[str, Any]:
    """What an artifact records of its data: task, class list and prompt, preprocessing."""
    out: dict[str, Any] = {"data": run_data, "task": splits.task}
    pre = getattr(task, "preprocess", None)
    out["preprocess"] = ({"image_size": pre.image_size, "fit": pre.fit, "mean": list(pre.mean), "std": list(pre.std)}
                         if pre is not None else None)
    out["image_size"] = pre.image_size if pre is not None else None
    if isinstance(task, ClassificationTask):
        out.update(classes=list(task.data.class_names), trained_classes=list(task.classes), prompt=task.prompt,
                   eval_splits={k: list(v) for k, v in (splits.eval_splits or {}).items()} or None)
    return out


def warm_start(run: RunSpec, handle: Handle) -> AdaptedModel:
    """The model of ``run.adapter`` (same method and backbone) to continue training from."""
    saved = read_config(run.adapter)  # type: ignore[arg-type]
    if saved.get("method") != run.method:
        raise ArtifactError(f"--adapter {run.adapter} holds a {saved.get('method')!r} adapter; warm-starting "
                            f"--method {run.method} needs an artifact of that method (or drop --adapter)")
    model = load_adapter(run.adapter, handle)  # type: ignore[arg-type]
    if run.options:
        wanted = AdaptedModel.build(handle, run.method, run.options).adapter_options()
        if wanted != model.adapter_options():
            raise InvalidInputError(f"--option {run.options} differs from the options of --adapter {run.adapter} "
                                    f"({model.adapter_options()}); a warm start keeps the artifact's options, "
                                    "so drop --option")
    return model


def resolved(train: TrainConfig, method_lr: float | None, model: AdaptedModel) -> TrainConfig:
    """``train`` with what it leaves to defaults filled in, as the artifact records it: the method's learning
    rate and, for a model with zeroth-order adapters, the estimator's settings.

    Raises:
        InvalidInputError: zeroth-order settings for a model without zeroth-order adapters.
    """
    config = replace(train, lr=train.lr if train.lr is not None else method_lr or 0.0)
    zo = zeroth_order_for(model, config)
    return replace(config, **zo.settings.fields()) if zo is not None else config


def train_and_save(run: RunSpec, progress: bool = True) -> dict[str, Any]:
    """Train, select on val, evaluate once on test; save to ``run.out`` when given. Returns a summary."""
    return train_model(run, progress)[0]


def train_model(run: RunSpec, progress: bool = True) -> tuple[dict[str, Any], AdaptedModel]:
    """``train_and_save``, also returning the trained model (in a process group: rank 0 tests and saves)."""
    method = get_method(run.method)
    if method.kind is MethodKind.LOGIT:
        raise InvalidInputError(f"method {run.method!r} is made by {method.trained_by}, not by this recipe")
    rank, world = world_position()
    if run.out and rank == 0:
        prepare_out(run.out, run.overwrite)  # refuses, before any work, a folder it could harm
    seed_everything(run.train.seed)
    splits = splits_for(run)  # a missing file is said before the backbone loads
    if splits.note:
        log.warning("%s", splits.note)
    handle = open_for(run.backbone, run.access, run.method, run.retry_s, run.device, run.dtype, run.recompute)
    task = make_task(splits, handle, run.image_size, loader=run.loader)
    model = warm_start(run, handle) if run.adapter else AdaptedModel.build(handle, run.method, run.options)
    model = place_model(model, run.device)
    config = resolved(run.train, method.lr, model)
    result = None
    ckpt = Path(run.out) / "checkpoint.pt" if run.out else None
    if method.slots:
        result = fit(model, task, splits.val, config, checkpoint=ckpt, progress=progress, tensorboard=run.tensorboard)
    start = time.perf_counter()
    calls = dict(result.calls) if result else {}
    calls.pop("step", None)
    calls.update(test=0, test_samples=0)
    with counted(model, calls, "test"):
        test = task.evaluate(model, splits.test) if splits.test is not None and rank == 0 else {}
    summary = {
        "backbone": handle.spec.id, "access": handle.access.label, "method": run.method, "data": run.data,
        "task": splits.task, "trainable_parameters": model.trainable_parameters() if result else 0,
        "steps": result.steps if result else 0, "best_val": result.best_metric if result else None,
        "train_seconds": result.seconds if result else 0.0, "step_seconds": result.step_seconds if result else 0.0,
        "test_seconds": time.perf_counter() - start, "test": test, "history": result.history if result else [],
        "lr": config.lr, "options": model.adapter_options(),
        "best_step": result.best_step if result else 0, "data_note": splits.note, "world_size": world,
        "calls": calls, "stopped": result.stopped if result else None,
        "zeroth_order": {k: v for k, v in asdict(config).items() if k.startswith("zo")} if config.zo else None,
    }
    if run.out and rank == 0:
        save_adapter(model, run.out, extra={"train": asdict(config), **describe(splits, task, run.data),
                                            "warm_start": run.adapter, "best_step": summary["best_step"],
                                            "metrics": {"test": test}, "calls": calls,
                                            "trainable_parameters": model.trainable_parameters()})
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)  # the run is finished; history.jsonl stays beside the adapter
    return summary, model


def evaluate_saved(backbone: str, adapter: str | None, data: str, task: str | None = None,
                   image_size: int | None = None, split: str = "test", loader: LoaderConfig | None = None,
                   device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Test metrics of a saved adapter of any method (or of the zero-shot backbone when ``adapter`` is None).

    The artifact says everything needed (method, options, access, grants, preprocessing); ``image_size``
    overrides its recorded size.
    """
    config = read_config(adapter) if adapter else {"method": "zero-shot", "access": "black-box"}
    method = artifact_method(config)  # older names read as what they meant then
    if method.kind is MethodKind.LOGIT:
        raise InvalidInputError(f"{adapter} holds a {config['method']} logit adapter; score it with "
                                "graytune.transfer.recipe.evaluate_transmiter (graytune eval does)")
    level = max(AccessLevel.parse(config["access"]), method.min_access)
    splits = load_whole(data, task) if split == "all" else load_splits(data, task)
    handle = open_for(backbone, level.label, method.name, device=device, dtype=dtype)
    pre = config.get("preprocess") or {}
    evaluator = make_task(splits, handle, image_size or pre.get("image_size") or config.get("image_size"),
                          fit=pre.get("fit"), loader=loader)
    model = load_adapter(adapter, handle) if adapter else AdaptedModel.build(handle, "zero-shot")
    model = place_model(model, device)
    scored = splits.val if split == "val" else splits.test
    return {"backbone": handle.spec.id, "method": config["method"], "data": data, "split": split,
            "items": len(scored), "data_note": splits.note, "test": evaluator.evaluate(model, scored)}
