"""Refusals that say what to do: which methods this server's level allows, and which owner's flag grants more.

A 403 from ``graytune serve`` names the level the server lends, the methods that train at it on this
backbone (with the reads it grants), and the ``graytune serve`` flag (``--access``, ``--reads``) that would
allow what was asked; white-box is refused with the reason (the weights never cross the network). A 401
says the key was not accepted and how to send one.

Example:
    >>> str(level_refused(AccessLevel.LIGHT_GRAY, service.handle))
    'light-gray access was asked for; this server lends minilm at dark-gray; methods that work at it: ...'
"""

from __future__ import annotations

import torch

from graytune.access import LocalHandle
from graytune.errors import AccessDeniedError, InvalidInputError, UnknownNameError
from graytune.methods import METHODS, MethodKind, backbone_kind
from graytune.types import AccessLevel, Op, PortKind

__all__ = ["UNAUTHORIZED", "check_port", "level_refused", "methods_at", "server_hint"]
_DTYPES = {"float32": torch.float32, "int64": torch.int64}

#: the 401 detail (the remote client replaces it with where its key came from)
UNAUTHORIZED = ("this server knows no such API key: send the key the owner gave you as 'Authorization: Bearer "
                "KEY' (graytune clients read it from $GRAYTUNE_API_KEY or api_key=)")


def methods_at(handle: LocalHandle) -> list[str]:
    """Methods that train against ``handle`` as it is lent: its level, its read grants, its kind of backbone."""
    kind = backbone_kind(handle.spec)
    return [name for name, m in METHODS.items() if m.kind is not MethodKind.WHITEBOX and m.min_access <= handle.access
            and kind in m.backbones and set(m.reads_on(handle.spec)) <= handle.grants]


def server_hint(handle: LocalHandle, needed: str) -> str:
    """What a client refused at ``handle`` can do: the methods it allows, and the owner's flag for ``needed``."""
    methods = ", ".join(methods_at(handle)) or "none"
    lends = f"this server lends {handle.spec.id} at {handle.access.label}"
    if handle.grants:
        lends += f" with reads at {', '.join(sorted(handle.grants))}"
    if handle.top_k_grant:
        lends += f", granting top-k log-probabilities up to k={handle.top_k_grant}"
    lends += f"; methods that work at it: {methods} (graytune methods describes them)"
    if needed == AccessLevel.WHITE_BOX.label:
        return (f"white-box access never crosses the network (LoRA and full fine-tuning need the weights in your "
                f"process); {lends}")
    levels = {level.label: level for level in AccessLevel}
    if needed in levels and levels[needed] <= handle.access:
        return f"{lends}; open the backbone at {needed} (open_backbone(URL, access={needed!r}), or a {needed} method)"
    if needed in levels:
        return f"{lends}; for more, the owner would run graytune serve --access {needed}"
    if "top-k" in needed:  # the refusal itself names the owner's flag
        return lends
    return f"{lends}; for reads, the owner would run graytune serve --reads PORT"


def level_refused(asked: AccessLevel, handle: LocalHandle) -> AccessDeniedError:
    """The 403 for a handle asked at ``asked`` from a server that lends ``handle`` (a lower level)."""
    return AccessDeniedError(f"{asked.label} access", asked.label, handle.access.label, message=(
        f"{asked.label} access was asked for; {server_hint(handle, asked.label)}"))


def check_port(handle: LocalHandle, name: str, op: str, grad: bool) -> None:
    """Raise what ``handle`` raises for ``op`` (``add``, ``insert``, ``read``) at the port ``name`` in a forward.

    A client sees only the ports of its level, so a port above it reads as unknown there; the server holds
    the whole spec and answers as the in-process handle does: ``AccessDeniedError`` (403) naming the level
    for a port that exists above the client's level, ``UnknownNameError`` (400) for one that does not. Nothing
    runs: the check is ``handle.check`` on a one-row probe of the port's modality.
    """
    if op not in ("add", "insert", "read"):
        raise InvalidInputError(f"op={op!r}: ask about add, insert or read")
    modality = name.split(".")[0]
    probe = {port.name: torch.zeros([d if isinstance(d, int) else 1 for d in port.shape], dtype=_DTYPES[port.dtype])
             for port in handle.spec.ports if port.kind is PortKind.INPUT and port.modality == modality
             and Op.REPLACE in port.ops and port.name.endswith((".input_ids", ".pixels"))}
    if not probe:
        raise UnknownNameError(f"port of backbone {handle.spec.id!r}", name, handle.spec.port_names())
    value = torch.zeros(1, 1, 1, requires_grad=grad)
    with torch.enable_grad():
        if op == "read":
            handle.check(dict(list(probe.items())[:1]), outputs=[], reads=[name])
        else:
            handle.check(dict(list(probe.items())[:1]), **{op: {name: value}})

