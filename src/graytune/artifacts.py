"""Saved adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT lays them out.

Only adapter tensors are saved (for white-box baselines, the client's trainable
copy: LoRA tensors, or every weight for full fine-tuning), never pickle. The
config records the library and format version, the method, its options, the
access level, the backbone id and fingerprint, and the exposure record. Writes
are atomic: a folder is written beside the target and renamed into place.

Example:
    >>> save_adapter(model, "out/dga", extra={"task": "retrieval"})
    >>> model2 = load_adapter("out/dga", handle)   # refuses another backbone
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import graytune
from graytune.access import Handle
from graytune.errors import ArtifactError
from graytune.model import AdaptedModel, WhiteboxConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def adapter_state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """The tensors an artifact holds: adapters, temperature, and trainable white-box weights."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith("backbone_module.") or k in trainable}


def save_adapter(model: AdaptedModel, folder: str | os.PathLike[str], options: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically; returns its path. ``extra`` (task, classes, metrics) goes into the config."""
    target = Path(folder)
    spec = model.handle.spec
    config = {
        "library": "graytune",
        "library_version": graytune.__version__,
        "format_version": FORMAT_VERSION,
        "method": model.method,
        "options": options or {},
        "access": model.handle.access.label,
        "backbone": spec.id,
        "fingerprint": spec.fingerprint,
        "adapters": [{"name": a.name, "modality": a.modality, "ports": list(a.ports), "reads": list(a.reads)}
                     for a in [*model.image_adapters, *model.text_adapters]],
        "trainable_parameters": model.trainable_parameters(),
        "exposure": model.handle.exposure.to_dict(),
        **(extra or {}),
    }
    state = adapter_state(model)
    return write_atomically(target, {
        WEIGHTS_NAME: lambda path: save_file(state, str(path), metadata={"format": "pt"}),
        CONFIG_NAME: lambda path: path.write_text(json.dumps(config, indent=2, sort_keys=True)),
    })


def write_atomically(target: Path, writers: dict[str, Callable[[Path], object]]) -> Path:
    """Write each file into a staging folder beside ``target``, then swap it into place.

    A reader sees the old folder or the new one, never a half-written one; a
    failure leaves the old folder untouched and no staging folder behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, write in writers.items():
            write(staging / name)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        staging.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def read_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The artifact's config; a clear error when the folder is not an artifact."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ArtifactError(f"{folder} is not a graytune adapter: {CONFIG_NAME} is missing; "
                            "give the --out folder of 'graytune train'")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path} is damaged ({err}); train again or restore it") from err
    if config.get("library") != "graytune" or config.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {config.get('format_version')} of {config.get('library')!r} is not "
                            f"one this graytune {graytune.__version__} reads (format <= {FORMAT_VERSION})")
    return config


def load_adapter(folder: str | os.PathLike[str], handle: Handle,
                 whitebox: WhiteboxConfig | None = None) -> AdaptedModel:
    """Rebuild the adapted model saved in ``folder`` around ``handle``.

    Raises:
        ArtifactError: missing or damaged files, or a backbone whose fingerprint differs.
    """
    config = read_config(folder)
    if config["fingerprint"] != handle.spec.fingerprint:
        raise ArtifactError(
            f"adapter in {folder} was trained on backbone {config['backbone']!r} (fingerprint "
            f"{config['fingerprint'][:16]}…), but this handle is {handle.spec.id!r} (fingerprint "
            f"{handle.spec.fingerprint[:16]}…); open the backbone it was trained on")
    model = AdaptedModel.build(handle, config["method"], whitebox, **config.get("options", {}))
    weights = Path(folder) / WEIGHTS_NAME
    if not weights.is_file():
        raise ArtifactError(f"{folder}: {WEIGHTS_NAME} is missing; the artifact is incomplete")
    state = load_file(str(weights))
    expected = adapter_state(model)
    if set(state) != set(expected):
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ArtifactError(f"{weights} does not fit method {config['method']!r}: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model
