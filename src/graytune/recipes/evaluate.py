"""Scoring a saved adapter (or the zero-shot backbone) on a data set: ``graytune eval``'s program.

A diffusion model's adapter can also be judged (``judge="hf-clip:DIR"``): its images for the held-out prompts
scored by a dual encoder, CLIP-T and CLIP-I beside the denoising loss (``graytune.eval.judge``).

Example:
    >>> evaluate_saved("minilm", "out/dga", "wordnet-supersense")["test"]["accuracy"]
    >>> evaluate_saved("arch:sd-tiny", "out/sd-dga", "concept/", judge="hf-clip:clip-dir")["test"]["clip_t"]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from graytune.access import Handle, open_backbone
from graytune.access.images import ImageSettings
from graytune.artifacts import load_adapter, read_config
from graytune.data.catalog import load_splits, load_whole
from graytune.data.stream import LoaderConfig
from graytune.errors import InvalidInputError
from graytune.eval.judge import (DEFAULT_JUDGE_IMAGES, JUDGE_METRICS, check_generator, check_judge,
                                 evaluate_generated)
from graytune.methods import MethodKind, artifact_method
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task, open_for, place_model
from graytune.types import AccessLevel


def evaluate_saved(backbone: str, adapter: str | None, data: str, task: str | None = None,
                   image_size: int | None = None, split: str | None = None, loader: LoaderConfig | None = None,
                   device: str | None = None, dtype: str | None = None, judge: str | None = None,
                   judge_images: int = DEFAULT_JUDGE_IMAGES, judge_settings: ImageSettings | None = None
                   ) -> dict[str, Any]:
    """Test metrics of a saved adapter of any method (or of the zero-shot backbone when ``adapter`` is None).

    The artifact says everything needed (method, options, access, grants, preprocessing); ``image_size``
    overrides its recorded size. ``split``: ``test``, ``val`` or ``all`` (a file scored whole); None (the
    default): a built-in set's or a file's own test split, and a file without splits whole, never re-split.

    ``judge``: a dual encoder's id (``hf-clip:DIR``, opened black-box) scoring a diffusion model's images for the
    first ``judge_images`` scored prompts, sampled with ``judge_settings`` (its size left out: the size the
    images are scored at); adds ``clip_t`` and ``clip_i`` to ``test`` and ``judge``, ``judged_images`` and
    ``judge_settings`` beside it (``graytune.eval.judge``).
    """
    config = read_config(adapter) if adapter else {"method": "zero-shot", "access": "black-box"}
    method = artifact_method(config)  # older names read as what they meant then
    if method.kind is MethodKind.LOGIT:
        raise InvalidInputError(f"{adapter} holds a {config['method']} logit adapter; score it with "
                                "graytune.recipes.transmiter.evaluate_transmiter (graytune eval does)")
    level = max(AccessLevel.parse(config["access"]), method.min_access)
    splits = load_whole(data, task) if split == "all" else load_splits(data, task, whole_if_unsplit=split is None)
    note = splits.note
    if splits.whole and config.get("data") == data:
        note += "; the adapter was trained on this file, so its training items are among those scored"
    handle = open_for(backbone, level.label, method.name, device=device, dtype=dtype)
    judge_handle = open_judge(handle, judge, device) if judge else None
    pre = config.get("preprocess") or {}
    evaluator = make_task(splits, handle, image_size or pre.get("image_size") or config.get("image_size"),
                          fit=pre.get("fit"), loader=loader, templates=config.get("prompt_templates") or ())
    model = load_adapter(adapter, handle) if adapter else AdaptedModel.build(handle, "zero-shot")
    model = place_model(model, device)
    split = "all" if splits.whole else split or "test"
    scored = splits.val if split == "val" else splits.test
    result = {"backbone": handle.spec.id, "method": config["method"], "data": data, "split": split,
              "items": len(scored), "data_note": note, "test": evaluator.evaluate(model, scored)}
    if judge_handle is not None:
        scores = judged(model, evaluator, scored, judge_handle, judge_images, judge_settings)
        result["test"].update({k: scores[k] for k in JUDGE_METRICS})
        result.update(judge=scores["judge"], judged_images=scores["judged_images"], judge_settings=scores["settings"])
    return result


def judged(model: AdaptedModel, task: Any, scored: Any, judge: Handle, count: int,
           settings: ImageSettings | None) -> dict[str, Any]:
    """``evaluate_generated`` on a ``DenoisingTask``'s scored split: its prompts, its real images' ``fit``, and
    images drawn at the size the task scores (unless ``settings`` names one)."""
    size = task.preprocess.image_size
    chosen = settings or ImageSettings()
    chosen = replace(chosen, height=chosen.height or size, width=chosen.width or size)
    return evaluate_generated(model, scored, task.prompts(scored), judge, chosen, count, fit=task.preprocess.fit)


def open_judge(handle: Handle, judge: str, device: str | None = None) -> Handle:
    """The judge ``judge`` names, opened black-box (its outputs only), once ``handle`` is known to generate images.

    Raises:
        InvalidInputError: ``handle`` is no diffusion model's, or the judge lacks a tower (``check_judge``).
    """
    check_generator(handle.spec)
    served = judge.startswith(("http://", "https://"))
    opened = open_backbone(judge, "black-box", device=None if served else device)
    check_judge(opened.spec)
    return opened
