"""Scoring a saved adapter (or the zero-shot backbone) on a data set: ``graytune eval``'s program.

Example:
    >>> evaluate_saved("minilm", "out/dga", "wordnet-supersense")["test"]["accuracy"]
"""

from __future__ import annotations

from typing import Any

from graytune.artifacts import load_adapter, read_config
from graytune.data.catalog import load_splits, load_whole
from graytune.data.stream import LoaderConfig
from graytune.errors import InvalidInputError
from graytune.methods import MethodKind, artifact_method
from graytune.model import AdaptedModel
from graytune.recipes.run import make_task, open_for, place_model
from graytune.types import AccessLevel


def evaluate_saved(backbone: str, adapter: str | None, data: str, task: str | None = None,
                   image_size: int | None = None, split: str | None = None, loader: LoaderConfig | None = None,
                   device: str | None = None, dtype: str | None = None) -> dict[str, Any]:
    """Test metrics of a saved adapter of any method (or of the zero-shot backbone when ``adapter`` is None).

    The artifact says everything needed (method, options, access, grants, preprocessing); ``image_size``
    overrides its recorded size. ``split``: ``test``, ``val`` or ``all`` (a file scored whole); None (the
    default): a built-in set's or a file's own test split, and a file without splits whole, never re-split.
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
    pre = config.get("preprocess") or {}
    evaluator = make_task(splits, handle, image_size or pre.get("image_size") or config.get("image_size"),
                          fit=pre.get("fit"), loader=loader)
    model = load_adapter(adapter, handle) if adapter else AdaptedModel.build(handle, "zero-shot")
    model = place_model(model, device)
    split = "all" if splits.whole else split or "test"
    scored = splits.val if split == "val" else splits.test
    return {"backbone": handle.spec.id, "method": config["method"], "data": data, "split": split,
            "items": len(scored), "data_note": note, "test": evaluator.evaluate(model, scored)}
