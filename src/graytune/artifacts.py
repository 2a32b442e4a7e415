"""Saved adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, as PEFT lays them out.

One format for every method (see ``graytune.artifact_files``): only adapter
tensors are saved (for white-box baselines, the client's trainable copy: LoRA
tensors under PEFT's names, or every weight for full fine-tuning), never pickle,
and the config describes the artifact completely, so loading needs nothing but
the folder and a handle on the same backbone.

Example:
    >>> save_adapter(model, "out/dga", extra={"task": "retrieval"})   # = model.save_pretrained(...)
    >>> model2 = load_adapter("out/dga", handle)   # = AdaptedModel.from_pretrained(...); refuses another backbone
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from graytune.access import Handle
from graytune.artifact_files import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    check_fingerprint,
    read_config,
    read_weights,
    write_artifact,
)
from graytune.model import AdaptedModel
from graytune.runs import prepare_out


def adapter_state(model: AdaptedModel) -> dict[str, torch.Tensor]:
    """The tensors an artifact holds: adapters, temperature, and trainable white-box weights."""
    return {k: v.clone() for k, v in model.adapter_state().items()}


def save_adapter(model: AdaptedModel, folder: str | os.PathLike[str], extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder`` atomically; returns its path. ``extra`` (task, classes, metrics) goes into the config."""
    return model.save_pretrained(folder, extra=extra)


def load_adapter(folder: str | os.PathLike[str], handle: Handle) -> AdaptedModel:
    """Rebuild the adapted model saved in ``folder`` around ``handle`` (see ``AdaptedModel.from_pretrained``)."""
    return AdaptedModel.from_pretrained(folder, handle)


__all__ = ["CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "adapter_state", "check_fingerprint", "load_adapter",
           "prepare_out", "read_config", "read_weights", "save_adapter", "write_artifact"]
