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
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel


def open_backbone(
    backbone_id: str, access: AccessLevel | str = AccessLevel.DARK_GRAY, *, reads: Collection[str] = (),
    api_key: str | None = None, retry_s: float | None = None, timeout_s: float | None = None,
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
        retry_s: for a server, how long a request is retried while the server cannot take it
            (a restart, a dropped connection, 503), in seconds; default 120.
        timeout_s: for a server, how long one attempt waits for its answer, in seconds; default 180.

    Returns:
        A handle exposing only what ``access`` (and ``reads``) allow.

    Raises:
        UnknownNameError: an unknown id or level; the message names the closest ones.
        InvalidInputError: ``retry_s`` or ``timeout_s`` given for an in-process backbone.
    """
    level = AccessLevel.parse(access)
    if backbone_id.startswith(("http://", "https://")):
        return RemoteHandle(backbone_id, level, reads, api_key, timeout_s, retry_s=retry_s)
    given = [name for name, value in (("retry_s", retry_s), ("timeout_s", timeout_s)) if value is not None]
    if given:
        raise InvalidInputError(f"{' and '.join(given)} apply to a backbone server (an http:// id); "
                                f"{backbone_id!r} runs in this process, so leave them out")
    return LocalHandle(load_backbone(backbone_id), level, reads)


def known_backbones() -> list[str]:
    """The ids ``open_backbone`` accepts (families shown with their argument)."""
    return BACKBONES.names()


__all__ = ["API_KEY_ENV", "PROTOCOL_VERSION", "BoundaryCall", "CallPlan", "Handle", "LocalHandle", "RemoteHandle",
           "known_backbones", "open_backbone", "texts_of"]
