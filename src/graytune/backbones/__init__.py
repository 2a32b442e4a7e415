"""Backbone providers: one file per model family; the only code that knows model internals.

Only ``graytune.access`` imports this package (an import-linter contract checks it).
Importing it registers every provider in ``BACKBONES`` (``backbones/registry.py``).

Example:
    >>> backbone = load_backbone("minilm")   # owner side: holds the frozen module
    >>> backbone.spec.port("text.embeds").shape
    ('B', 384)
"""

from __future__ import annotations

from graytune.backbones import (  # noqa: F401  (importing a provider registers it)
    arch,
    bridge,
    diffusion_arch,
    diffusion_tiny,
    efficientnet,
    hf_causal,
    hf_clip,
    hf_diffusion,
    hf_siglip,
    hf_text,
    hf_vision,
    minilm,
)
from graytune.backbones.registry import BACKBONES, load_backbone

__all__ = ["BACKBONES", "load_backbone"]
