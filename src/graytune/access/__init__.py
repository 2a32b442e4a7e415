"""The access boundary: the one place that holds a backbone module.

Example:
    >>> h = graytune.open_backbone("bridge:efficientnet-lite0+minilm", access="dark-gray")
    >>> h.spec.port("image.pixels").shape
    ('B', 3, 'H', 'W')
"""

from __future__ import annotations

from collections.abc import Collection

from graytune.access.checks import CallPlan, texts_of
from graytune.access.handle import Handle
from graytune.access.local import LocalHandle
from graytune.access.owner import BoundaryCall
from graytune.access.remote import API_KEY_ENV, RemoteHandle
from graytune.access.wire import PROTOCOL_VERSION
from graytune.backbones import BACKBONES, load_backbone
from graytune.types import AccessLevel


def open_backbone(
    backbone_id: str, access: AccessLevel | str = AccessLevel.DARK_GRAY, *, reads: Collection[str] = (),
    api_key: str | None = None,
) -> Handle:
    """Open a backbone behind the boundary at one access level.

    Args:
        backbone_id: ``minilm``, ``efficientnet-lite0``, ``efficientnet-lite1``,
            ``bridge:efficientnet-lite0+minilm``, ``hf-clip:<dir or hub id>``, or the
            ``http://host:port`` of a ``graytune serve`` (a ``RemoteHandle``).
        access: ``black-box``, ``dark-gray`` (default), ``light-gray`` or ``white-box``.
        reads: input or entry ports whose values the owner lets the client read
            (e.g. ``["text.token_embeds"]`` for AdaLink); each reveals weights.
        api_key: for a server, the key the owner gave you (default: $GRAYTUNE_API_KEY).

    Returns:
        A handle exposing only what ``access`` (and ``reads``) allow.

    Raises:
        UnknownNameError: an unknown id or level; the message names the closest ones.
    """
    level = AccessLevel.parse(access)
    if backbone_id.startswith(("http://", "https://")):
        return RemoteHandle(backbone_id, level, reads, api_key)
    return LocalHandle(load_backbone(backbone_id), level, reads)


def known_backbones() -> list[str]:
    """The ids ``open_backbone`` accepts (families shown with their argument)."""
    return BACKBONES.names()


__all__ = ["API_KEY_ENV", "PROTOCOL_VERSION", "BoundaryCall", "CallPlan", "Handle", "LocalHandle", "RemoteHandle",
           "known_backbones", "open_backbone", "texts_of"]
