"""The table of backbone ids: each provider file registers its builder here.

Providers import ``BACKBONES`` from this module, not from the package, so the
package face (``backbones/__init__.py``) can import the providers without a loop.

Example:
    >>> @BACKBONES.register("minilm")
    ... def build_minilm() -> MiniLM: ...
    >>> backbone = load_backbone("minilm")
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
