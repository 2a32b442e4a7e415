"""One training run end to end: open the backbone, build the method, fit, test once, save the artifact.

``run_once`` is the one run every program calls (``graytune train``, ``compare`` and the demo, the
study scripts); ``train_model`` adds the run folder around it (``--out``: refused before any work
if it could harm what is there, checkpointed, the artifact written at the end).

Example:
    >>> result = train_and_save(RunSpec("minilm", "dark-gray", "dga", "wordnet-supersense", out="out/dga"))
    >>> result["test"]["accuracy"]
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from graytune.access import Handle, open_backbone
from graytune.artifacts import load_adapter, read_config, save_adapter
from graytune.data.catalog import BUILTIN, Splits, load_splits
from graytune.data.files import content_sha256
from graytune.data.stream import LoaderConfig
from graytune.data.images import ImagePreprocess
from graytune.data.labeled import LabeledImageFiles, LabeledImages, LabeledTexts
from graytune.devices import parse_device
from graytune.errors import ArtifactError, InvalidInputError
from graytune.methods import MethodKind, artifact_method, backbone_kind, get_method
from graytune.model import AdaptedModel
from graytune.runs import checkpoint_path, prepare_out
from graytune.train.budget import counted
from graytune.train.completions import CompletionTask
from graytune.train.denoising import DenoisingTask
from graytune.train.config import TrainConfig
from graytune.train.distributed import world_position
from graytune.train.gradients import zeroth_order_for
from graytune.train.loop import fit, seed_everything
from graytune.train.tasks import ClassificationTask, RetrievalTask, SketchRetrievalTask, Task
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
    templates: tuple[str, ...] = ()
    """A diffusion model's prompt templates, ``{}`` where each image's caption goes (default: the data's, ``a picture
    of {}``); with several, each row draws one per step (``graytune.train.denoising``)."""


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
              loader: LoaderConfig | None = None, templates: Sequence[str] = ()) -> Task:
    """The task the data asks for, on ``handle``'s kind of backbone (a language model learns completions, a
    diffusion model denoises the images).

    Raises:
        InvalidInputError: data the backbone's kind does not train on (``check_data``).
    """
    kind = check_data(splits, handle)
    if templates and kind != "diffusion":
        raise InvalidInputError(f"--template sets a diffusion model's prompts; {handle.spec.id} is {KIND_NAMES[kind]}"
                                ": drop --template")
    if kind == "causal-lm":
        if image_size is not None:
            raise InvalidInputError(f"--image-size is for image data; {splits.name} holds prompts and completions")
        return CompletionTask(splits.train, handle)
    if kind == "diffusion":
        return DenoisingTask(splits.train, handle, list(templates) or splits.prompt or "{}", image_size,
                             fit or splits.fit, loader)
    needs_images = splits.task in ("retrieval", "sketch") or isinstance(splits.train, LabeledImages | LabeledImageFiles)
    pre = ImagePreprocess.from_spec(handle.spec, image_size, fit=fit or splits.fit) if needs_images else None
    if splits.task == "retrieval":
        return RetrievalTask(splits.train, pre, loader)  # type: ignore[arg-type]
    if splits.task == "sketch":
        return SketchRetrievalTask(splits.train, pre, loader)  # type: ignore[arg-type]
    return ClassificationTask(splits.train, splits.prompt, pre, splits.classes, splits.eval_splits, loader)


#: per kind of backbone, what it is called, the data it trains on, and how to say so
KIND_NAMES = {"causal-lm": "a language model", "diffusion": "a diffusion model", "encoder": "an encoder"}
TRAINS_ON = {
    "causal-lm": (("generation",), "language models train on prompt/completion data (a JSONL of prompt and "
                  "completion fields or chat messages, or the built-in wordnet-category, wordnet-reverse, "
                  "fortunes-topic)"),
    "diffusion": (("retrieval", "classification", "images"), "diffusion models train on images: a folder of images "
                  "of one concept (captions in <image>.txt beside them), image,caption rows, class folders, or the "
                  "built-in tuxpaint"),
    "encoder": (("retrieval", "classification", "sketch"), "encoders train on retrieval and classification sets"),
}


def check_data(splits: Splits, handle: Handle) -> str:
    """``handle``'s kind of backbone (``graytune.methods.backbone_kind``), once ``splits`` is data it trains on."""
    kind = backbone_kind(handle.spec)
    tasks, says = TRAINS_ON[kind]
    images_held = not isinstance(splits.train, LabeledTexts)
    if splits.task not in tasks or (kind == "diffusion" and not images_held):
        what = f"{splits.task} data" + ("" if images_held or kind != "diffusion" else " of texts")
        raise InvalidInputError(f"{splits.name} is {what} and {handle.spec.id} is {KIND_NAMES[kind]}: {says}")
    return kind


def splits_for(run: RunSpec) -> Splits:
    """The run's data: ``run.data``, or its explicit split files (both: refused)."""
    return load_splits(run.data, run.task, **data_files(run))


def data_files(run: RunSpec) -> dict[str, str]:
    """The split files the run was given (``--train``/``--val``/``--test``), by split; empty with ``--data``."""
    return {k: v for k, v in run.files.items() if v}


def data_label(run: RunSpec) -> str:
    """The run's data as its summary and artifact name it: ``--data``'s value, or ``train FILE, val FILE``."""
    files = data_files(run)
    return ", ".join(f"{k} {v}" for k, v in files.items()) if files else run.data or ""


def data_settings(run: RunSpec, splits: Splits) -> dict[str, Any]:
    """What a resumed run must share of its data: the name or split files, each file's content hash
    (``graytune.data.files.content_sha256``; a built-in set, or any name that is not a path, is its name),
    the task, the warm start."""
    sources = [source.removesuffix(":base-to-novel") for source in list(data_files(run).values()) or [run.data]]
    hashes = {source: content_sha256(source) for source in sources
              if source not in BUILTIN and Path(source).exists()}
    settings = {"data": data_label(run), "data_sha256": hashes, "task": splits.task, "warm_start": run.adapter}
    return {**settings, "templates": list(run.templates)} if run.templates else settings


def split_sizes(splits: Splits) -> dict[str, int | None]:
    """Items in each split (``test`` None: no test split)."""
    return {name: None if part is None else len(part)
            for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))}


def describe(splits: Splits, task: Task, run_data: str) -> dict[str, Any]:
    """What an artifact records of its data: task, split sizes, class list and prompt, preprocessing."""
    out: dict[str, Any] = {"data": run_data, "task": splits.task, "split_sizes": split_sizes(splits)}
    pre = getattr(task, "preprocess", None)
    out["preprocess"] = ({"image_size": pre.image_size, "fit": pre.fit, "mean": list(pre.mean), "std": list(pre.std)}
                         if pre is not None else None)
    out["image_size"] = pre.image_size if pre is not None else None
    if isinstance(task, DenoisingTask):
        out.update(prompt_templates=list(task.templates))
    if isinstance(task, ClassificationTask):
        out.update(classes=list(task.data.class_names), trained_classes=list(task.classes), prompt=task.prompt,
                   eval_splits={k: list(v) for k, v in (splits.eval_splits or {}).items()} or None)
    return out


def warm_start(adapter: str, method: str, options: dict[str, Any], handle: Handle) -> AdaptedModel:
    """The model of the artifact ``adapter`` (same method and backbone) to continue training from."""
    saved = read_config(adapter)
    if saved.get("method") != method:
        raise ArtifactError(f"--adapter {adapter} holds a {saved.get('method')!r} adapter; warm-starting "
                            f"--method {method} needs an artifact of that method (or drop --adapter)")
    model = load_adapter(adapter, handle)
    if options:
        wanted = AdaptedModel.build(handle, method, options).adapter_options()
        if wanted != model.adapter_options():
            raise InvalidInputError(f"--option {options} differs from the options of --adapter {adapter} "
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


@dataclass
class Opened:
    """What the runs of one study share: the backbone handle, the task over the training split, and the
    validation and test splits (``test`` None: not scored)."""

    handle: Handle
    task: Task
    val: Any
    test: Any


def run_once(opened: Opened, method: str, train: TrainConfig, options: dict[str, Any] | None = None,
             adapter: str | None = None, device: str | None = None, checkpoint: Path | None = None,
             progress: bool = False, tensorboard: bool = False, score_val: bool = False,
             settings: dict[str, Any] | None = None,
             pause: threading.Event | None = None) -> tuple[dict[str, Any], AdaptedModel]:
    """One run: seed, build (or warm-start from ``adapter``), fit and select on val, test once; a row.

    ``settings``: what a resume from ``checkpoint`` must share besides the training settings and options
    (``data_settings``). ``pause``: see ``fit`` (a job's pause: ``Paused`` once the step under way is saved).

    Every program that trains calls this: ``graytune train`` (``train_model``), ``compare`` (the demo's
    table) and the study scripts. The adapters are built right after seeding, so one seed gives the same
    initial adapter whatever was opened before. ``score_val``: an untrained method (zero-shot) is scored on
    the validation split too, as studies compare it with trained ones. In a process group, rank 0 tests.

    Returns:
        The row (``method``, ``access``, ``lr``, ``seed``, ``options``, ``trainable_parameters``, ``steps``,
        ``stopped``, ``best_val``, ``best_step``, ``history``, ``train_seconds``, ``step_seconds``, ``calls``,
        ``test``, ``test_seconds``, ``zeroth_order``, ``train``: the settings as resolved) and the model, in its
        best validated state.
    """
    spec, handle = get_method(method), opened.handle
    seed_everything(train.seed)
    model = warm_start(adapter, method, options or {}, handle) if adapter else \
        AdaptedModel.build(handle, method, options)
    model = place_model(model, device)
    config = resolved(train, spec.lr, model)
    result = fit(model, opened.task, opened.val, config, checkpoint=checkpoint, progress=progress,
                 tensorboard=tensorboard, settings=settings, pause=pause) if spec.slots else None
    best_val = result.best_metric if result else None
    if result is None and score_val:
        best_val = opened.task.evaluate(model, opened.val)[opened.task.primary]
    start = time.perf_counter()
    calls = dict(result.calls) if result else {}
    calls.pop("step", None)
    calls.update(test=0, test_samples=0)
    with counted(model, calls, "test"):
        test = opened.task.evaluate(model, opened.test) if opened.test is not None and world_position()[0] == 0 \
            else {}
    row = {"method": method, "access": handle.access.label, "lr": config.lr, "seed": config.seed,
           "options": model.adapter_options(), "trainable_parameters": model.trainable_parameters() if result else 0,
           "steps": result.steps if result else 0, "stopped": result.stopped if result else None,
           "best_val": best_val, "best_step": result.best_step if result else 0,
           "history": result.history if result else [], "train_seconds": result.seconds if result else 0.0,
           "step_seconds": result.step_seconds if result else 0.0, "calls": calls, "test": test,
           "test_seconds": time.perf_counter() - start,
           "zeroth_order": {k: v for k, v in asdict(config).items() if k.startswith("zo")} if config.zo else None,
           "train": asdict(config)}
    return row, model


def open_run(run: RunSpec) -> tuple[Splits, Opened]:
    """``run``'s data and backbone, opened at the method's level with its grants (data first: a missing file
    is said before the backbone loads)."""
    splits = splits_for(run)
    if splits.note:
        log.warning("%s", splits.note)
    handle = open_for(run.backbone, run.access, run.method, run.retry_s, run.device, run.dtype, run.recompute)
    task = make_task(splits, handle, run.image_size, loader=run.loader, templates=run.templates)
    return splits, Opened(handle, task, splits.val, splits.test)


def train_model(run: RunSpec, progress: bool = True,
                pause: threading.Event | None = None) -> tuple[dict[str, Any], AdaptedModel]:
    """``train_and_save``, also returning the trained model (in a process group: rank 0 tests and saves).

    ``pause``: see ``fit`` (needs ``run.out``)."""
    method = get_method(run.method)
    if method.kind is MethodKind.LOGIT:
        raise InvalidInputError(f"method {run.method!r} is made by {method.trained_by}, not by this recipe")
    rank, world = world_position()
    if run.out and rank == 0:
        prepare_out(run.out, run.overwrite)  # refuses, before any work, a folder it could harm
    seed_everything(run.train.seed)
    splits, opened = open_run(run)
    ckpt = checkpoint_path(run.out)
    settings = data_settings(run, splits) if ckpt is not None else None
    row, model = run_once(opened, run.method, run.train, run.options, run.adapter, run.device, ckpt, progress,
                          run.tensorboard, settings=settings, pause=pause)
    label = data_label(run)
    summary = {"backbone": opened.handle.spec.id, "data": label, "data_files": data_files(run) or None,
               "task": splits.task, "split_sizes": split_sizes(splits), **row, "data_note": splits.note,
               "world_size": world}
    del summary["seed"]
    if run.out and rank == 0:
        save_adapter(model, run.out, extra={"train": row["train"], **describe(splits, opened.task, label),
                                            "data_files": summary["data_files"],
                                            "warm_start": run.adapter, "best_step": summary["best_step"],
                                            "metrics": {"test": row["test"]}, "calls": row["calls"],
                                            "trainable_parameters": model.trainable_parameters()})
        if ckpt is not None:
            ckpt.unlink(missing_ok=True)  # the run is finished; history.jsonl stays beside the adapter
    return summary, model
