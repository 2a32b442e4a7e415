"""The access boundary: the one place that holds a backbone module.

Example:
    >>> h = graytune.open_backbone("bridge:efficientnet-lite0+minilm", access="dark-gray")
    >>> h.spec.port("image.pixels").shape
    ('B', 3, 'H', 'W')
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from graytune.access.checks import CallPlan, texts_of
from graytune.access.handle import Handle
from graytune.access.local import LocalHandle
from graytune.access.memo import MemoHandle, memoize
from graytune.access.metered import BudgetSpent, MeteredHandle, metered
from graytune.access.owner import BoundaryCall
from graytune.access.remote import API_KEY_ENV, RemoteHandle
from graytune.access.wire import PROTOCOL_VERSION
from graytune.backbones import BACKBONES, load_backbone
from graytune.backbones.base import place
from graytune.devices import parse_device, parse_dtype
from graytune.errors import InvalidInputError
from graytune.types import AccessLevel


def open_backbone(
    backbone_id: str, access: AccessLevel | str = AccessLevel.DARK_GRAY, *, reads: Collection[str] = (),
    device: torch.device | str | None = None, dtype: torch.dtype | str | None = None, recompute: bool = False,
    api_key: str | None = None, retry_s: float | None = None, timeout_s: float | None = None, top_k: int = 0,
) -> Handle:
    """Open a backbone behind the boundary at one access level.

    Args:
        backbone_id: ``minilm``, ``efficientnet-lite0``, ``efficientnet-lite1``,
            ``bridge:efficientnet-lite0+minilm``, ``hf-clip:``/``hf-siglip:``/``hf-text:``/``hf-vision:``
            followed by a folder or hub id, ``arch:clip-vit-b-16`` (random weights, for benchmarks), or the
            ``http://host:port`` of a ``graytune serve`` (a ``RemoteHandle``).
        access: ``black-box``, ``dark-gray`` (default), ``light-gray`` or ``white-box``.
        reads: input or entry ports whose values the owner lets the client read
            (e.g. ``["text.token_embeds"]`` for AdaLink); each reveals weights.
        device: where the backbone runs (``cpu``, ``cuda``, ``cuda:1``); default CUDA when present, else CPU.
            Results come back on the device of the client's tensors (the handle's ``device`` when
            a request holds none), so in process client and owner share one device with no copies.
        dtype: the backbone's precision: ``fp32`` (default), ``bf16``/``bfloat16``, ``fp16`` or a torch dtype.
            Half precision casts the frozen weights; client tensors cross in float32 and are cast
            in, outputs and gradients come back in float32 (fp16 gradients are scaled to stay in range).
        recompute: keep only each layer's inputs during a gradient call and recompute the layers
            inside the VJP: exact (the weights are frozen), less memory, one more forward of time.
        api_key: for a server, the key the owner gave you (default: $GRAYTUNE_API_KEY).
        retry_s: for a server, how long a request is retried while the server cannot take it
            (a restart, a dropped connection, 503), in seconds; default 120.
        timeout_s: for a server, how long one attempt waits for its answer, in seconds; default 180.
        top_k: for a language model, the most next tokens a forward may read per position with their
            log-probabilities (``forward(..., top_k=k)``, ``graytune.access.topk``); 0 (default): none. The
            owner's grant, at most ``types.MAX_TOP_K``: each position reveals k values of the next-token
            distribution. For a server, at most what its owner grants (``graytune serve --grant-topk``).

    Returns:
        A handle exposing only what ``access`` (and ``reads``) allow.

    Raises:
        UnknownNameError: an unknown id or level; the message names the closest ones.
        InvalidInputError: ``retry_s`` or ``timeout_s`` given for an in-process backbone, or
            ``device``/``dtype``/``recompute`` for a server's (its owner chose them), or an unknown
            device or dtype.
    """
    level = AccessLevel.parse(access)
    if backbone_id.startswith(("http://", "https://")):
        owner_side = [name for name, value in (("device", device), ("dtype", dtype), ("recompute", recompute or None))
                      if value is not None]
        if owner_side:
            raise InvalidInputError(
                f"{' and '.join(owner_side)} of a served backbone are the owner's choice (graytune serve --device "
                "--dtype --recompute); leave them out here: results come back in float32 on your tensors' device")
        return RemoteHandle(backbone_id, level, reads, api_key, timeout_s, retry_s=retry_s, top_k=top_k)
    given = [name for name, value in (("retry_s", retry_s), ("timeout_s", timeout_s)) if value is not None]
    if given:
        raise InvalidInputError(f"{' and '.join(given)} apply to a backbone server (an http:// id); "
                                f"{backbone_id!r} runs in this process, so leave them out")
    where, precision = parse_device(device), parse_dtype(dtype)
    return LocalHandle(place(load_backbone(backbone_id), where, precision), level, reads, bool(recompute), top_k)


def known_backbones() -> list[str]:
    """The ids ``open_backbone`` accepts (families shown with their argument)."""
    return BACKBONES.names()


__all__ = ["API_KEY_ENV", "PROTOCOL_VERSION", "BoundaryCall", "BudgetSpent", "CallPlan", "Handle", "LocalHandle",
           "MemoHandle", "MeteredHandle", "RemoteHandle", "known_backbones", "memoize", "metered", "open_backbone",
           "texts_of"]
