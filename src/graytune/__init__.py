"""graytune: adapt foundation models you cannot see inside.

Example:
    >>> import graytune
    >>> h = graytune.open_backbone("minilm", access="dark-gray")
    >>> h.encode_text(["a cat", "a kitten"]).shape
    torch.Size([2, 384])
"""

from __future__ import annotations

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


__all__ = [
    "AccessDeniedError", "AccessLevel", "ArtifactError", "BackboneSpec", "Exposure", "GraytuneError",
    "InvalidInputError", "MissingDependencyError", "NumericalError", "Op", "PortKind", "PortSpec", "UnknownNameError",
    "__version__", "known_backbones", "memoize", "open_backbone",
]
