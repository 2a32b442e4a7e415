"""Backbone providers: one file per model family; the only code that knows model internals.

Only ``graytune.access`` imports this package (an import-linter contract checks it).

Example:
    >>> backbone = load_backbone("minilm")   # owner side: holds the frozen module
    >>> backbone.spec.port("text.embeds").shape
    ('B', 384)
"""

from __future__ import annotations

from graytune.registry import Registry

BACKBONES: Registry = Registry("backbone")


def load_backbone(backbone_id: str):  # type: ignore[no-untyped-def]
    """Build the backbone called ``backbone_id`` (see ``BACKBONES.names()``).

    Raises:
        UnknownNameError: no such id; the message lists the closest ones.
    """
    builder, arg = BACKBONES.lookup(backbone_id)
    return builder() if arg is None else builder(arg)


from graytune.backbones import arch, bridge, efficientnet, hf_clip, hf_siglip, hf_text, hf_vision, minilm  # noqa: E402,F401  (they register)
