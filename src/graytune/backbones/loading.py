"""Where a backbone's weights come from: a weights file's identity and transformers checkpoints.

``file_identity`` names a weights file for the spec's fingerprint (not its path);
``load_hf_checkpoint`` loads a transformers model and its tokenizer from a folder or a
hub id, and ``image_normalisation`` reads the image mean and std its processor declares.
Nothing here downloads on graytune's own initiative: transformers is told ``local_files_only``
(a hub id loads from the local cache at once, with no retries against an unreachable hub) unless
the user sets ``GRAYTUNE_ALLOW_DOWNLOADS=1`` (``hub_options``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from graytune.errors import InvalidInputError, MissingDependencyError


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' per-load progress bar (library code logs, it does not print)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


#: The environment variable by which a user lets transformers download what a hub id names.
ALLOW_DOWNLOADS = "GRAYTUNE_ALLOW_DOWNLOADS"
#: What to do when a hub id is not on this machine (every loader's error says it).
BRING_YOUR_OWN = (f"save the model, its tokenizer and processor to a folder with save_pretrained and give that folder "
                  f"(README: bring your own CLIP), or set {ALLOW_DOWNLOADS}=1 to let transformers download it")


def hub_options() -> dict[str, bool]:
    """``from_pretrained``'s ``local_files_only``: True (a hub id must be in the local cache) unless the user
    set ``GRAYTUNE_ALLOW_DOWNLOADS=1``."""
    return {"local_files_only": os.environ.get(ALLOW_DOWNLOADS, "").strip().lower() not in ("1", "true", "yes")}


@functools.cache
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike[str]) -> str:
    """``name:size:sha256`` of a weights file: its identity, not its content."""
    p = Path(path)
    st = p.stat()
    return f"{p.name}:{st.st_size}:{_file_sha256(str(p), st.st_size, st.st_mtime_ns)}"


@dataclass
class HFCheckpoint:
    """A transformers model and tokenizer loaded by ``load_hf_checkpoint``."""

    model: nn.Module
    tokenizer: Any
    where: str  #: the folder, or the hub id when ``source`` is no folder
    identity: str  #: the weight files' identity (``file_identity``), or ``hub:<id>``


def checkpoint_location(family: str, source: str, written_by: str) -> tuple[Path, str]:
    """``source`` as a local folder (``~`` expanded) and what ``from_pretrained`` should get: the folder,
    or ``source`` itself as a hub id.

    Raises:
        MissingDependencyError: ``source`` looks like a path (``.``, ``/``, ``~``) but is no folder; the
            message says what should be there (``written_by``).
    """
    local = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not local.is_dir():
        raise MissingDependencyError(
            f"{family}: {source!r} is not a directory; give a folder written by {written_by} or a hub id"
        )
    return local, str(local) if local.is_dir() else source


def load_hf_checkpoint(family: str, source: str, model_class: str,
                       model_types: Mapping[str, str]) -> HFCheckpoint:
    """``transformers.<model_class>`` and its tokenizer from a folder (``save_pretrained``) or a hub id.

    Example:
        >>> ckpt = load_hf_checkpoint("hf-clip", "/models/clip", "CLIPModel", {"clip": ""})

    Args:
        family: the id prefix the errors name, e.g. ``hf-clip``.
        source: a local folder or a hub id.
        model_class: the transformers class, e.g. ``CLIPModel``.
        model_types: per ``config.json`` ``model_type``: ``""`` if this family loads it, else advice on
            what loads it instead (e.g. ``{"siglip": "", "clip": "use hf-clip:<dir>"}``).

    Raises:
        MissingDependencyError: transformers (or the tokenizer's library) is missing, or nothing
            could be loaded from ``source``; nothing is ever downloaded on graytune's own initiative.
        InvalidInputError: ``source`` holds a model of another type.
    """
    try:
        import transformers
        from transformers import AutoTokenizer, PretrainedConfig
    except ImportError as err:
        raise MissingDependencyError(f"{family} backbones need transformers: pip install transformers") from err
    local, where = checkpoint_location(family, source, f"{model_class}.save_pretrained (with its tokenizer)")
    hub = hub_options()
    try:
        with quiet_loading():
            config, _ = PretrainedConfig.get_config_dict(where, **hub)
            if not config:
                raise OSError(f"no config.json in {where}")
            _check_model_type(family, source, str(config.get("model_type")), model_types)
            model = getattr(transformers, model_class).from_pretrained(where, **hub)
            tokenizer = AutoTokenizer.from_pretrained(where, **hub)
    except OSError as err:
        raise MissingDependencyError(
            f"{family}: could not load a {model_class} and tokenizer from {source!r}: {_first_line(err)}; "
            f"graytune never downloads on its own: {BRING_YOUR_OWN}"
        ) from err
    except ImportError as err:  # a tokenizer whose library is missing (SentencePiece ones)
        raise MissingDependencyError(
            f"{family}: the tokenizer saved in {source!r} needs a package that is not installed ({err}); "
            "install it (SentencePiece tokenizers: pip install sentencepiece protobuf)"
        ) from err
    weights = sorted([*local.glob("*.safetensors"), *local.glob("*.bin")]) if local.is_dir() else []
    identity = "+".join(file_identity(w) for w in weights) or f"hub:{source}"
    return HFCheckpoint(model, tokenizer, where, identity)


def _first_line(err: BaseException) -> str:
    """An error's first line (transformers' own advice below it points at the hub, which graytune does not use)."""
    return str(err).strip().split("\n", 1)[0]


def _check_model_type(family: str, source: str, model_type: str, model_types: Mapping[str, str]) -> None:
    loads = [t for t, advice in model_types.items() if not advice]
    if model_type not in loads:
        advice = model_types.get(model_type) or "use the loader made for that model"
        raise InvalidInputError(f"{family}: {source!r} holds a model of type {model_type!r} (config.json); "
                                f"{family} loads {' or '.join(repr(t) for t in loads)}; {advice}")


def image_normalisation(where: str, default: tuple[list[float], list[float]],
                        default_name: str) -> tuple[list[float], list[float], str]:
    """The image mean and std a checkpoint's image processor declares, and where they came from.

    Read as transformers reads them: the ``image_processor`` entry of ``processor_config.json``
    (what a processor's ``save_pretrained`` writes in transformers 5) first, then
    ``preprocessor_config.json`` (an image processor's own file, and older processors');
    ``do_normalize: false`` means mean 0 and std 1. Only when neither file gives them, ``default``.

    Example:
        >>> mean, std, came_from = image_normalisation("/models/clip", (OPENAI_MEAN, OPENAI_STD), "OpenAI CLIP's")

    Returns:
        ``(mean, std, source)``: three values each, and a line saying where they came from.
    """
    found = image_processor_config(where)
    if found is None:
        return list(default[0]), list(default[1]), f"{default_name} (the checkpoint has no image processor config)"
    cfg, label = found
    if cfg.get("do_normalize") is False:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], f"{label}: do_normalize is false"
    if "image_mean" in cfg and "image_std" in cfg:
        return _three(cfg["image_mean"], label, "image_mean"), _three(cfg["image_std"], label, "image_std"), label
    return list(default[0]), list(default[1]), f"{default_name} ({label} sets no image_mean/image_std)"


def image_processor_config(where: str) -> tuple[dict[str, Any], str] | None:
    """The checkpoint's image processor settings and the file they came from, as transformers finds them:
    the ``image_processor`` entry of ``processor_config.json`` first, then ``preprocessor_config.json``."""
    for name, key in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        cfg = hub_json(where, name)
        if isinstance(cfg, dict) and key is not None:
            cfg = cfg.get(key)
        if isinstance(cfg, dict):
            return cfg, f"{name} ({key})" if key is not None else name
    return None


def hub_json(where: str, name: str) -> Any:
    """The JSON file ``name`` of a local folder or a hub repo (``None`` when it has none).

    A hub id reads through transformers' cache, as ``from_pretrained`` does: nothing is fetched
    unless the user allows downloads (``hub_options``).
    """
    path: Path | None = Path(where) / name
    if not Path(where).is_dir():
        try:
            from transformers.utils import cached_file

            found = cached_file(where, name, _raise_exceptions_for_missing_entries=False,
                                _raise_exceptions_for_connection_errors=False, **hub_options())
        except (ImportError, OSError, ValueError):  # not a hub id at all: from_pretrained says so next
            found = None
        path = Path(found) if found else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"{where}: {name} is not readable JSON ({err}); repair or remove it") from err


def _three(value: object, where: str, key: str) -> list[float]:
    """An RGB statistic as three floats (a single number stands for all three channels)."""
    values = [value] * 3 if isinstance(value, (int, float)) else value
    if (not isinstance(values, (list, tuple)) or len(values) != 3
            or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            or (key == "image_std" and min(values) <= 0)):
        raise InvalidInputError(f"{where}: {key} is {value!r}; expected three finite numbers (std above 0), "
                                "one per RGB channel")
    return [float(v) for v in values]
