"""TransMiter runs on the real data sets: extract from a weak fine-tuned adapter, transfer, evaluate.

Used by ``scripts/transmiter_results.py``. Images are classified by class-name prompts (CLIP
style); unlabeled images come from the training split with their labels dropped.

Example:
    >>> px = load_pixels(load_splits("fashion-mnist:base-to-novel"), weak_handle, 64)
    >>> base_novel_accuracy(tm.predict(strong, px.test), px.test_labels, (0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from tqdm.auto import tqdm

from graytune.access import Handle, open_backbone
from graytune.artifacts import check_fingerprint, load_adapter, read_config
from graytune.data.catalog import Splits, load_splits
from graytune.data.images import ImagePreprocess, pixel_cache
from graytune.errors import ArtifactError, InvalidInputError
from graytune.eval.classification import split_accuracy
from graytune.transfer.transmiter import (
    ExtractConfig,
    PlusConfig,
    TransMiter,
    load_transmiter,
    save_transmiter,
)

Tensor = torch.Tensor


@dataclass
class Pixels:
    """Preprocessed images of one data set's splits at one size (shared by every backbone of a family)."""

    unlabeled: Tensor
    train: Tensor
    train_labels: Tensor
    val: Tensor
    val_labels: Tensor
    test: Tensor
    test_labels: Tensor


def load_pixels(splits: Splits, handle: Handle, image_size: int, unlabeled: Any,
                shots: int | None = None, progress: bool = True) -> Pixels:
    """Pixels of the ``unlabeled`` images (labels unused), a labelled ``shots``-per-class subset of train, val, test.

    ``unlabeled`` is any set with ``pil(i)``; keep it disjoint from ``splits.val`` and ``splits.test``.
    ``progress`` shows a bar per set decoded (rate and ETA) on stderr.
    """
    if splits.task != "classification" or not hasattr(splits.train, "pil"):
        raise InvalidInputError(f"TransMiter runs on image classification sets; {splits.name} is {splits.task}")
    pre = ImagePreprocess.from_spec(handle.spec, image_size, fit=splits.fit)

    def pixels(data: Any, idx: list[int], name: str) -> Tensor:
        chunks = [pixel_cache([], pre)]  # the right empty shape when idx is empty
        with tqdm(total=len(idx), desc=f"images {name}", unit="img", disable=not progress) as bar:
            for start in range(0, len(idx), 256):
                chunks.append(pixel_cache([data.pil(i) for i in idx[start:start + 256]], pre))
                bar.update(len(chunks[-1]))
        return torch.cat(chunks)

    labels = splits.train.labels
    few = list(range(len(labels)))
    if shots:
        few = [i for c in sorted(set(labels.tolist())) for i in (labels == c).nonzero().flatten().tolist()[:shots]]
    return Pixels(pixels(unlabeled, list(range(len(unlabeled))), "unlabeled"), pixels(splits.train, few, "train"),
                  labels[few], pixels(splits.val, list(range(len(splits.val))), "val"), splits.val.labels,
                  pixels(splits.test, list(range(len(splits.test))), "test"), splits.test.labels)


def base_novel_accuracy(scores: Tensor, labels: Tensor, base: tuple[int, ...], novel: tuple[int, ...]
                        ) -> dict[str, float]:
    """Accuracy among base classes on base samples, among novel on novel, and their harmonic mean (%)."""
    return split_accuracy(scores, labels, {"base": base, "novel": novel})


def plus(tm: TransMiter, strong: Handle, pixels: Pixels, seed: int = 0, config: PlusConfig | None = None,
         progress: bool = True) -> dict[str, float]:
    """TransMiter+: fine-tune the transferred adapter on the labelled few-shot set, select on val."""
    config = config or PlusConfig(seed=seed)
    return tm.finetune(tm.scores(strong, pixels.train, progress, "scores train"), pixels.train_labels,
                       tm.scores(strong, pixels.val, progress, "scores val"), pixels.val_labels, config,
                       progress=progress)


# -- the command-line runs: extract, transfer, TransMiter+ -------------------------------------


def _image_pixels(splits: Splits, handle: Handle, image_size: int | None, shots: int | None = None) -> Pixels:
    return load_pixels(splits, handle, image_size or int(handle.spec.preprocess["image"]["image_size"]),
                       unlabeled=splits.train, shots=shots)


def _evaluate(tm: TransMiter, strong: Handle, splits: Splits, px: Pixels) -> dict[str, float]:
    scores = tm.predict(strong, px.test, progress=True)
    out = {"accuracy": float((scores.argmax(1) == px.test_labels).float().mean())}
    if splits.eval_splits:
        out.update(base_novel_accuracy(scores, px.test_labels, splits.eval_splits["base"],
                                       splits.eval_splits["novel"]))
    return out


def _load_for(adapter: str, backbone_id: str, hint: str = "") -> tuple[TransMiter, dict[str, Any], Handle]:
    """The saved TransMiter, its config, and a black-box handle of ``backbone_id``, whose fingerprint must match."""
    tm, config = load_transmiter(adapter)
    handle = open_backbone(backbone_id, access="black-box")
    check_fingerprint(config, handle.spec, adapter, hint or "open the backbone it was made on")
    return tm, config, handle


def run_extract(weak_id: str, weak_adapter: str, data: str, out: str, classes: int = 1024, seed: int = 0,
                image_size: int | None = None) -> dict[str, Any]:
    """Extract a TransMiter from a saved weak adapter, on the training images with labels unused; save it."""
    splits = load_splits(data)
    weak = open_backbone(weak_id, access="black-box")
    saved = read_config(weak_adapter)
    fine_tuned = load_adapter(weak_adapter, open_backbone(weak_id, access=saved["access"],
                                                          reads=saved.get("reads", ())))
    px = _image_pixels(splits, weak, image_size)
    tm = TransMiter.create(list(splits.train.class_names), total=classes, seed=seed, prompt=splits.prompt)
    teacher = tm.scores(fine_tuned, px.unlabeled, progress=True, desc="teacher scores")[:, :tm.n_task]
    weak_scores = tm.scores(weak, px.unlabeled, progress=True, desc="weak scores")
    history = tm.extract(weak_scores, teacher, ExtractConfig(seed=seed))
    save_transmiter(tm, out, weak.spec.id, weak.spec.fingerprint,
                    extra={"source_adapter": str(weak_adapter), "data": data, "image_size": image_size,
                           "extract_loss": history})
    return {"out": out, "classes": len(tm.classes), "task_classes": tm.n_task, "extract_loss": history}


def run_transfer(adapter: str, strong_id: str, data: str, out: str, beta: float = 500.0,
                 image_size: int | None = None) -> dict[str, Any]:
    """Move a saved TransMiter from its weak backbone to ``strong_id``, forward only; save and test it."""
    saved = read_config(adapter)
    if saved.get("transferred_to"):
        raise ArtifactError(f"{adapter} was already transferred to {saved['transferred_to']}; transfer the "
                            "adapter extracted on the weak backbone")
    tm, config, weak = _load_for(adapter, saved["backbone"], "the weak backbone changed since extraction")
    strong = open_backbone(strong_id, access="black-box")
    splits = load_splits(data)
    px = _image_pixels(splits, strong, image_size or config.get("image_size"))
    start = time.perf_counter()
    moved = tm.transfer(tm.scores(weak, px.unlabeled, progress=True, desc="weak scores"),
                        tm.scores(strong, px.unlabeled, progress=True, desc="strong scores"), beta=beta)
    seconds = time.perf_counter() - start
    metrics = _evaluate(moved, strong, splits, px)
    save_transmiter(moved, out, strong.spec.id, strong.spec.fingerprint,
                    extra={"transferred_from": config["backbone"], "transferred_to": strong.spec.id, "beta": beta,
                           "data": data, "image_size": image_size or config.get("image_size"),
                           "metrics": {"test": metrics}})
    return {"out": out, "transfer_seconds": seconds, "gradient_queries": weak.exposure.gradient_queries
            + strong.exposure.gradient_queries, "test": metrics}


def run_plus(adapter: str, backbone: str, data: str, out: str, shots: int | None = 16, seed: int = 0,
             image_size: int | None = None, config: PlusConfig | None = None) -> dict[str, Any]:
    """TransMiter+: fine-tune a transferred adapter with ``shots`` labels per class; select on val; save.

    ``config`` sets the optimiser (lr, batch size, steps, warm-up, weight decay); its seed is ``seed``.
    """
    tm, saved, handle = _load_for(adapter, backbone, "transfer it there first")
    splits = load_splits(data)
    size = image_size or saved.get("image_size")
    px = _image_pixels(splits, handle, size, shots=shots)
    config = replace(config or PlusConfig(), seed=seed)
    best = plus(tm, handle, px, config=config)
    metrics = _evaluate(tm, handle, splits, px)
    save_transmiter(tm, out, handle.spec.id, handle.spec.fingerprint,
                    extra={**{k: v for k, v in saved.items() if k in ("transferred_from", "transferred_to")},
                           "method": "transmiter+", "plus": {"shots": shots, **best}, "train": asdict(config),
                           "data": data, "image_size": size, "metrics": {"test": metrics}})
    return {"out": out, "best_val": best, "test": metrics, "train": asdict(config)}


def evaluate_transmiter(adapter: str, backbone: str, data: str, image_size: int | None = None) -> dict[str, Any]:
    """Test metrics of a saved TransMiter on the backbone it was transferred to (or extracted on)."""
    tm, config, handle = _load_for(adapter, backbone)
    splits = load_splits(data)
    px = _image_pixels(splits, handle, image_size or config.get("image_size"))
    return {"backbone": handle.spec.id, "method": config["method"], "data": data,
            "test": _evaluate(tm, handle, splits, px)}
