"""graytune: adapt foundation models you cannot see inside.

The nouns users touch are importable from here: the boundary (``open_backbone``, ``memoize``,
``AccessLevel``), the adapted model (``AdaptedModel``, ``get_method``), training (``fit``,
``TrainConfig``, ``run_once``, ``RunSpec``, ``train_and_save``), artifacts (``save_adapter``,
``load_adapter``) and the errors. The training and artifact names load on first use, so
``import graytune`` (and ``graytune --help``) stays as fast as the boundary alone.

Example:
    >>> import graytune
    >>> h = graytune.open_backbone("minilm", access="dark-gray")
    >>> h.encode_text(["a cat", "a kitten"]).shape
    torch.Size([2, 384])
    >>> model = graytune.AdaptedModel.build(h, "dga")
    >>> graytune.fit(model, task, val_data, graytune.TrainConfig(max_steps=100))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from graytune.errors import (
    AccessDeniedError,
    ArtifactError,
    GraytuneError,
    InvalidInputError,
    MissingDependencyError,
    NumericalError,
    UnknownNameError,
)
from graytune.access import known_backbones, memoize, open_backbone
from graytune.types import AccessLevel, BackboneSpec, Exposure, Op, PortKind, PortSpec

__version__ = "0.1.0"

#: name → the module that defines it, imported on first use
_LAZY = {
    "AdaptedModel": "graytune.model", "get_method": "graytune.methods", "METHODS": "graytune.methods",
    "fit": "graytune.train.loop", "TrainConfig": "graytune.train.config", "FitResult": "graytune.train.state",
    "save_adapter": "graytune.artifacts", "load_adapter": "graytune.artifacts",
    "run_once": "graytune.recipes.run", "RunSpec": "graytune.recipes.run", "train_and_save": "graytune.recipes.run",
    "evaluate_saved": "graytune.recipes.evaluate", "calls_curve": "graytune.runs",
}

if TYPE_CHECKING:
    from graytune.artifacts import load_adapter, save_adapter
    from graytune.methods import METHODS, get_method
    from graytune.model import AdaptedModel
    from graytune.recipes.evaluate import evaluate_saved
    from graytune.recipes.run import RunSpec, run_once, train_and_save
    from graytune.runs import calls_curve
    from graytune.train.config import TrainConfig
    from graytune.train.loop import fit
    from graytune.train.state import FitResult


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'graytune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "METHODS", "AccessDeniedError", "AccessLevel", "AdaptedModel", "ArtifactError", "BackboneSpec", "Exposure",
    "FitResult", "GraytuneError", "InvalidInputError", "MissingDependencyError", "NumericalError", "Op", "PortKind",
    "PortSpec", "RunSpec", "TrainConfig", "UnknownNameError", "__version__", "calls_curve", "evaluate_saved", "fit",
    "get_method", "known_backbones", "load_adapter", "memoize", "open_backbone", "run_once", "save_adapter",
    "train_and_save",
]
