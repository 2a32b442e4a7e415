"""TransMiter runs on the real data sets: extract from a weak fine-tuned adapter, transfer, evaluate.

Used by ``scripts/transmiter_results.py``. Queries, images or texts, are classified by class-name
prompts through the text tower (CLIP style); unlabeled queries come from the training split with
their labels dropped. Text sets (``wordnet-supersense``, ``fortunes``) run on text encoders
(``minilm``, ``hf-text:DIR``), image sets on image–text backbones.

Example:
    >>> px = load_queries(load_splits("fashion-mnist:base-to-novel"), weak_handle, 64)
    >>> base_novel_accuracy(tm.predict(strong, px.test), px.test_labels, (0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    >>> texts = load_queries(load_splits("wordnet-supersense"), open_backbone("minilm"))   # texts: no size
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from graytune.access import Handle, open_backbone
from graytune.artifacts import check_fingerprint, load_adapter, read_config
from graytune.data.catalog import Splits, load_splits
from graytune.data.images import ImagePreprocess, pixel_cache
from graytune.errors import ArtifactError, InvalidInputError
from graytune.eval.classification import split_accuracy
from graytune.runs import RunLogger, open_logger
from graytune.transfer.classes import DEFAULT_DRAW
from graytune.transfer.transmiter import (
    BETA,
    ExtractConfig,
    PlusConfig,
    Queries,
    TransMiter,
    load_transmiter,
    procrustes_beta,
    save_transmiter,
)

Tensor = torch.Tensor


@dataclass
class QuerySets:
    """One data set's queries, ready to score: preprocessed images ``[N, 3, S, S]`` (one size, shared by
    every backbone of a family) or texts, with the labels of the labelled splits."""

    unlabeled: Queries
    train: Queries
    train_labels: Tensor
    val: Queries
    val_labels: Tensor
    test: Queries
    test_labels: Tensor


Pixels = QuerySets  # the name from when TransMiter scored images only


def query_modality(splits: Splits) -> str:
    """``"image"`` or ``"text"``: what the items of a classification set are.

    Raises:
        InvalidInputError: ``splits`` is not a classification set of images or texts.
    """
    if splits.task == "classification" and hasattr(splits.train, "pil"):
        return "image"
    if splits.task == "classification" and hasattr(splits.train, "texts"):
        return "text"
    raise InvalidInputError(f"TransMiter runs on classification sets of images or texts; {splits.name} is for "
                            f"{splits.task}")


def check_towers(splits: Splits, handle: Handle) -> str:
    """The set's query modality, once ``handle`` is known to have the towers TransMiter needs for it.

    Queries go through their own tower, class prompts through the text tower.

    Raises:
        InvalidInputError: the backbone lacks the query's tower or the text tower.
    """
    modality = query_modality(splits)
    needed = sorted({modality, "text"})
    missing = [m for m in needed if m not in handle.spec.modalities]
    if missing:
        kind = "an image–text backbone (bridge:…, hf-clip:…)" if modality == "image" else \
            "a text encoder (minilm, hf-text:DIR) or an image–text backbone"
        raise InvalidInputError(f"{splits.name} holds {modality} items, scored against class prompts through the "
                                f"text tower: TransMiter needs the {' and '.join(needed)} tower(s); "
                                f"{handle.spec.id} has {', '.join(handle.spec.modalities)} only. Choose {kind}")
    return modality


def load_queries(splits: Splits, handle: Handle, image_size: int | None = None, unlabeled: Any = None,
                 shots: int | None = None, progress: bool = True, base_only: bool = False) -> QuerySets:
    """The ``unlabeled`` queries (labels unused), a labelled ``shots``-per-class subset of train, val, test.

    Images are preprocessed for ``handle`` at ``image_size`` (default: the backbone's own); texts are
    kept as strings (each backbone tokenizes its own). ``unlabeled`` (default: ``splits.train``) is a
    set of the same kind (``pil(i)`` for images, ``texts`` for texts); keep it disjoint from
    ``splits.val`` and ``splits.test``. ``progress`` shows a bar per image set decoded on stderr.

    ``base_only`` keeps, of ``unlabeled``, the items of the classes trained on (``splits.classes``,
    the base of a base-to-novel set): the paper's protocol, where no novel-class item is seen before
    test. A base-to-novel set's own ``train`` holds base items only already; a pool given as
    ``unlabeled`` may hold novel ones (transductive) unless ``base_only`` drops them.

    Raises:
        InvalidInputError: the set is not image or text classification, the backbone lacks a tower it
            needs, ``image_size`` is given for texts, or ``base_only`` for a set that is not base-to-novel.
    """
    modality = check_towers(splits, handle)
    unlabeled = splits.train if unlabeled is None else unlabeled
    if base_only:
        unlabeled = base_items(unlabeled, splits)
    if modality == "text":
        if image_size is not None:
            raise InvalidInputError(f"an image size ({image_size}) was given for {splits.name}, whose items are "
                                    "texts; leave --image-size out")

        def take(data: Any, idx: list[int], name: str) -> Queries:
            return [data.texts[i] for i in idx]
    else:
        size = image_size or int(handle.spec.preprocess["image"]["image_size"])
        pre = ImagePreprocess.from_spec(handle.spec, size, fit=splits.fit)

        def take(data: Any, idx: list[int], name: str) -> Queries:
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
    return QuerySets(take(unlabeled, list(range(len(unlabeled))), "unlabeled"), take(splits.train, few, "train"),
                     labels[few], take(splits.val, list(range(len(splits.val))), "val"), splits.val.labels,
                     take(splits.test, list(range(len(splits.test))), "test"), splits.test.labels)


def base_items(data: Any, splits: Splits) -> Any:
    """The items of ``data`` (a labelled set) whose label is one of ``splits.classes`` (a base-to-novel base).

    Raises:
        InvalidInputError: ``splits`` trains on every class (not base-to-novel), so there is no base.
    """
    if splits.classes is None or not splits.eval_splits:
        raise InvalidInputError(f"a base-only unlabeled pool needs a base-to-novel set; {splits.name} trains on every "
                                f"class: use {splits.name}:base-to-novel, or leave base_only off")
    keep = set(splits.classes)
    return data.subset([i for i, y in enumerate(data.labels.tolist()) if y in keep])


def load_pixels(splits: Splits, handle: Handle, image_size: int, unlabeled: Any,
                shots: int | None = None, progress: bool = True) -> QuerySets:
    """``load_queries`` for an image set at ``image_size`` (the name scripts written before text queries use)."""
    return load_queries(splits, handle, image_size, unlabeled, shots, progress)


def base_novel_accuracy(scores: Tensor, labels: Tensor, base: tuple[int, ...], novel: tuple[int, ...]
                        ) -> dict[str, float]:
    """Accuracy among base classes on base samples, among novel on novel, and their harmonic mean (%)."""
    return split_accuracy(scores, labels, {"base": base, "novel": novel})


def plus(tm: TransMiter, strong: Handle, queries: QuerySets, seed: int = 0, config: PlusConfig | None = None,
         progress: bool = True, logger: RunLogger | None = None) -> dict[str, float]:
    """TransMiter+: fine-tune the transferred adapter on the labelled few-shot set, select on val.

    ``logger`` (``graytune.runs.open_logger``) gets each validation as ``graytune train`` writes them to
    ``history.jsonl``: a ``step`` record (``loss``: the cross-entropy on the labelled set after the pass) and a
    ``val`` record (``accuracy``, ``best`` as the selection decides it), the transferred adapter at step 0.
    """
    config = config or PlusConfig(seed=seed)
    train = tm.scores(strong, queries.train, progress, "scores train")
    val = tm.scores(strong, queries.val, progress, "scores val")
    with _recorded(tm, train, queries.train_labels, val, queries.val_labels, logger):
        return tm.finetune(train, queries.train_labels, val, queries.val_labels, config, progress=progress)


@contextlib.contextmanager
def _recorded(tm: TransMiter, train: Tensor, train_labels: Tensor, val: Tensor, val_labels: Tensor,
              logger: RunLogger | None) -> Iterator[None]:
    """While fine-tuning, log each validation ``finetune`` makes (its adapter's forward on ``val``); every other
    forward of the adapter is an optimizer step."""
    if logger is None:
        yield
        return
    seen = {"steps": 0, "passes": 0, "best": -1.0, "busy": False}

    def observe(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if seen["busy"]:
            return
        if inputs[0] is not val:
            seen["steps"] += 1
            return
        seen["busy"] = True
        try:
            with torch.no_grad():
                loss = float(F.cross_entropy(tm.adapt(train), train_labels))
        finally:
            seen["busy"] = False
        accuracy = float((output[:, :tm.n_task].argmax(-1) == val_labels).float().mean())
        best = accuracy > seen["best"]  # the selection's rule: a later pass must do strictly better
        seen["best"] = max(seen["best"], accuracy)
        step, epoch = seen["steps"], seen["passes"]
        if step:
            logger.log({"event": "step", "step": step, "epoch": epoch, "loss": loss, "train_calls": 0})
        logger.log({"event": "val", "step": step, "epoch": epoch, "metrics": {"accuracy": accuracy},
                    "primary": "accuracy", "best": best, "train_loss": loss, "train_calls": 0})
        seen["passes"] += 1

    hook = tm.adapter.register_forward_hook(observe)
    try:
        yield
    finally:
        hook.remove()
        logger.close()


# -- the command-line runs: extract, transfer, TransMiter+ -------------------------------------


def _check_classes(tm: TransMiter, splits: Splits, adapter: str) -> None:
    """The data set's classes must be the adapter's task classes, in order."""
    names = list(splits.train.class_names)
    if tm.classes[:tm.n_task] != names:
        raise InvalidInputError(f"{adapter} was extracted over the task classes {tm.classes[:tm.n_task][:5]}… "
                                f"({tm.n_task}); {splits.name} has {names[:5]}… ({len(names)}): use the data set it "
                                "was extracted on")


def _evaluate(tm: TransMiter, strong: Handle, splits: Splits, px: QuerySets) -> dict[str, float]:
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
                image_size: int | None = None, aux_draw: str = DEFAULT_DRAW) -> dict[str, Any]:
    """Extract a TransMiter from a saved weak adapter, on the training images or texts with labels unused; save it.
    ``aux_draw``: how the auxiliary names are drawn (``graytune.transfer.classes.DRAWS``)."""
    splits = load_splits(data)
    weak = open_backbone(weak_id, access="black-box")
    px = load_queries(splits, weak, image_size)  # a set the backbone's towers cannot score is refused first
    saved = read_config(weak_adapter)
    fine_tuned = load_adapter(weak_adapter, open_backbone(weak_id, access=saved["access"],
                                                          reads=saved.get("reads", ())))
    tm = TransMiter.create(list(splits.train.class_names), total=classes, seed=seed, prompt=splits.prompt,
                          aux_draw=aux_draw)
    teacher = tm.scores(fine_tuned, px.unlabeled, progress=True, desc="teacher scores")[:, :tm.n_task]
    weak_scores = tm.scores(weak, px.unlabeled, progress=True, desc="weak scores")
    history = tm.extract(weak_scores, teacher, ExtractConfig(seed=seed))
    save_transmiter(tm, out, weak.spec.id, weak.spec.fingerprint,
                    extra={"source_adapter": str(weak_adapter), "data": data, "image_size": image_size,
                           "queries": query_modality(splits), "extract_loss": history, "aux_draw": aux_draw})
    return {"out": out, "classes": len(tm.classes), "task_classes": tm.n_task, "aux_draw": aux_draw,
            "extract_loss": history}


def run_transfer(adapter: str, strong_id: str, data: str, out: str, beta: float = BETA,
                 image_size: int | None = None, beta_per_sample: float | None = None) -> dict[str, Any]:
    """Move a saved TransMiter from its weak backbone to ``strong_id``, forward only; save and test it.

    The backbones may differ in width and tokenizer: the basis change aligns their scores over the saved
    class list, never their embeddings. ``beta_per_sample``, when given, replaces ``beta`` by
    ``beta_per_sample`` × N (N: the unlabeled queries; see ``TransMiter.transfer``).
    """
    saved = read_config(adapter)
    if saved.get("transferred_to"):
        raise ArtifactError(f"{adapter} was already transferred to {saved['transferred_to']}; transfer the "
                            "adapter extracted on the weak backbone")
    tm, config, weak = _load_for(adapter, saved["backbone"], "the weak backbone changed since extraction")
    strong = open_backbone(strong_id, access="black-box")
    splits = load_splits(data)
    _check_classes(tm, splits, adapter)
    check_towers(splits, weak)
    px = load_queries(splits, strong, image_size or config.get("image_size"))  # texts: each backbone tokenizes
    start = time.perf_counter()
    moved = tm.transfer(tm.scores(weak, px.unlabeled, progress=True, desc="weak scores"),
                        tm.scores(strong, px.unlabeled, progress=True, desc="strong scores"), beta=beta,
                        beta_per_sample=beta_per_sample)
    seconds = time.perf_counter() - start
    metrics = _evaluate(moved, strong, splits, px)
    beta = procrustes_beta(len(px.unlabeled), beta, beta_per_sample)
    save_transmiter(moved, out, strong.spec.id, strong.spec.fingerprint,
                    extra={"transferred_from": config["backbone"], "transferred_to": strong.spec.id, "beta": beta,
                           "beta_per_sample": beta_per_sample, "unlabeled": len(px.unlabeled),
                           "data": data, "image_size": image_size or config.get("image_size"),
                           "queries": query_modality(splits), "metrics": {"test": metrics}})
    return {"out": out, "transfer_seconds": seconds, "gradient_queries": weak.exposure.gradient_queries
            + strong.exposure.gradient_queries, "test": metrics}


def run_plus(adapter: str, backbone: str, data: str, out: str, shots: int | None = 16, seed: int = 0,
             image_size: int | None = None, config: PlusConfig | None = None) -> dict[str, Any]:
    """TransMiter+: fine-tune a transferred adapter with ``shots`` labels per class; select on val; save.

    ``config`` sets the optimiser (lr, batch size, steps, warm-up, weight decay); its seed is ``seed``.
    """
    tm, saved, handle = _load_for(adapter, backbone, "transfer it there first")
    splits = load_splits(data)
    _check_classes(tm, splits, adapter)
    size = image_size or saved.get("image_size")
    px = load_queries(splits, handle, size, shots=shots)
    config = replace(config or PlusConfig(), seed=seed)
    about = {"method": "transmiter+", "data": data, "task": "classification", "backbone": handle.spec.id}
    best = plus(tm, handle, px, config=config, logger=open_logger(out, about=about))
    metrics = _evaluate(tm, handle, splits, px)
    save_transmiter(tm, out, handle.spec.id, handle.spec.fingerprint,
                    extra={**{k: v for k, v in saved.items() if k in ("transferred_from", "transferred_to")},
                           "method": "transmiter+", "plus": {"shots": shots, **best}, "train": asdict(config),
                           "data": data, "image_size": size, "queries": query_modality(splits),
                           "metrics": {"test": metrics}})
    return {"out": out, "best_val": best, "test": metrics, "train": asdict(config)}


def evaluate_transmiter(adapter: str, backbone: str, data: str, image_size: int | None = None) -> dict[str, Any]:
    """Test metrics of a saved TransMiter on the backbone it was transferred to (or extracted on)."""
    tm, config, handle = _load_for(adapter, backbone)
    splits = load_splits(data)
    _check_classes(tm, splits, adapter)
    px = load_queries(splits, handle, image_size or config.get("image_size"))
    return {"backbone": handle.spec.id, "method": config["method"], "data": data,
            "test": _evaluate(tm, handle, splits, px)}
