"""The wire protocol shared by the remote client and the server: safetensors, never pickle.

A message is one safetensors blob: an 8-byte header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw little-endian bytes. The
request's other fields ride in the header's ``__metadata__`` as one JSON string.
``decode`` checks the header against the body before any tensor is built: allowed
dtypes, shapes, byte ranges that tile the body exactly, and a bounded header.

This module is the one place that names the protocol's parts. Tensors are named
``<group>/<port>``:

- a forward request (``POST /v1/forward``): ``inputs/<port>``, ``add/<port>``,
  ``insert/<port>`` (a ``CallPlan``'s groups); metadata ``access``, ``outputs``,
  ``reads``, ``grad`` (the tensor names that want gradients), optionally ``texts``, ``top_k`` (a language
  model's next tokens to read, answered as ``read/text.top_ids`` and ``read/text.top_logprobs``), and
  optionally ``request`` (a key the client picks per forward: a retried forward with the
  same key replaces its earlier attempt's session instead of leaving an orphan);
- its answer: ``out/<port>`` per output, ``read/<port>`` per port read; metadata ``session``;
- a VJP request (``POST /v1/vjp``): ``grad/<port>`` per output, and metadata ``session``,
  or (after a 410) the whole forward request again with ``recompute: true``;
- its answer: ``<group>/<port>`` for each client tensor that wanted a gradient;
- a generation (``POST /v1/generate``): a forward request's tensors, token maps ``maps/<port>/down`` and
  ``maps/<port>/up``, metadata ``settings`` and ``stream``; its answer ``ids`` and ``lengths`` with ``texts``
  in the metadata (written and read by ``graytune.access.generation``).

Every message's metadata carries ``protocol`` (``PROTOCOL_VERSION``); a message
without it is read as version 1.

Example:
    >>> body = pack_call(plan, "dark-gray")            # client
    >>> request = unpack_call(read_request(body))      # server
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from graytune.access.checks import CallPlan, texts_of
from graytune.access.topk import TOP_K_NAMES
from graytune.errors import InvalidInputError

Tensor = torch.Tensor
#: tensors and metadata of one decoded message, as ``decode`` returns them.
Message = tuple[dict[str, Tensor], dict[str, Any]]

#: the protocol this library speaks; every message's metadata carries it (``"protocol"``).
PROTOCOL_VERSION = 1
#: the oldest protocol this library still reads (a server answers it on ``/v1/spec`` as ``protocol_min``).
PROTOCOL_MIN = 1
#: dtypes allowed on the wire (safetensors name → bytes per element); ports take float32 or int64.
WIRE_DTYPES = {"F32": 4, "I64": 8}
MAX_HEADER_BYTES = 1 << 20
_META_KEY = "graytune"
#: tensor name groups: a call's client tensors (``CallPlan``'s fields), gradients sent back, outputs, reads.
INPUTS, ADD, INSERT, GRAD, OUT, READ = "inputs", "add", "insert", "grad", "out", "read"
CALL_GROUPS = (INPUTS, ADD, INSERT)


class WireError(InvalidInputError):
    """A message that is not a well-formed graytune safetensors blob."""


class ProtocolError(WireError):
    """A message or a peer that speaks a protocol version this library does not."""


def encode(tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """One safetensors blob holding ``tensors`` (made contiguous, on CPU) and ``meta`` as JSON.

    ``meta`` gets ``"protocol": PROTOCOL_VERSION`` unless it names a version itself.
    """
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    meta = {"protocol": PROTOCOL_VERSION, **(meta or {})}
    return st_save(plain, metadata={_META_KEY: json.dumps(meta)})


def decode(body: bytes, max_tensors: int = 256) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and metadata from a blob; ``WireError`` naming the first problem found."""
    header = _header(body)
    meta_raw = header.pop("__metadata__", None) or {}
    if len(header) > max_tensors:
        raise WireError(f"{len(header)} tensors in one message; at most {max_tensors} are accepted")
    data_len = len(body) - 8 - struct.unpack("<Q", body[:8])[0]
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"tensor {name!r}: header entry must hold dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in WIRE_DTYPES:
            raise WireError(f"tensor {name!r}: dtype {dtype} is not allowed; send one of "
                            f"{', '.join(sorted(WIRE_DTYPES))} (float32 or int64)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise WireError(f"tensor {name!r}: shape {shape!r} must be a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise WireError(f"tensor {name!r}: data_offsets {offsets!r} must be two integers")
        if offsets[1] - offsets[0] != math.prod(shape) * WIRE_DTYPES[dtype]:
            raise WireError(f"tensor {name!r}: the header says shape {shape} ({dtype}) but gives "
                            f"{offsets[1] - offsets[0]} bytes for it")
        spans.append(tuple(offsets))
    spans.sort()
    end = 0
    for start, stop in spans:
        if start != end:
            raise WireError("the tensors' byte ranges overlap or leave gaps; the message is damaged")
        end = stop
    if end != data_len:
        raise WireError(f"the header accounts for {end} bytes of data but the body carries {data_len}; "
                        "the message is truncated or padded")
    try:
        tensors = st_load(body)
        meta = json.loads(meta_raw.get(_META_KEY, "{}")) if isinstance(meta_raw, dict) else None
    except Exception as err:  # safetensors raises its own error type; json a ValueError
        raise WireError(f"the message could not be read: {err}") from None
    if not isinstance(meta, dict):
        raise WireError("the message metadata must be a JSON object")
    return tensors, meta


def _header(body: bytes) -> dict[str, Any]:
    if len(body) < 8:
        raise WireError(f"a message of {len(body)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", body[:8])
    if body[:1] in (b"{", b"[") and size > MAX_HEADER_BYTES:
        raise WireError("the body looks like JSON; this endpoint takes a graytune safetensors message "
                        "(graytune.access.wire.encode), e.g. with texts in its metadata")
    if size > MAX_HEADER_BYTES or 8 + size > len(body):
        raise WireError(f"the header claims {size} bytes but the body has {len(body) - 8} after its length; "
                        f"headers are at most {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(body[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        hint = "; send a safetensors message, not JSON" if body[:1] == b"{" else ""
        raise WireError(f"the header is not valid JSON{hint}") from None
    except RecursionError:
        raise WireError("the header nests JSON too deeply; a safetensors header is one flat object") from None
    if not isinstance(header, dict):
        raise WireError("the header must be a JSON object")
    return header


def tensor_name(group: str, port: str) -> str:
    """A tensor's name on the wire, e.g. ``tensor_name(ADD, "text.token_embeds") == "add/text.token_embeds"``."""
    return f"{group}/{port}"


# ---- protocol versions -------------------------------------------------------------------------------

def message_protocol(meta: Mapping[str, Any]) -> int:
    """The protocol version a message's metadata names; 1 when it names none (clients before versioning)."""
    version = meta.get("protocol", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise WireError(f"'protocol' must be a positive integer version; got {version!r}")
    return version


def check_request_protocol(meta: Mapping[str, Any]) -> int:
    """The version of a request the server received; ``ProtocolError`` when this library cannot read it."""
    version = message_protocol(meta)
    if version > PROTOCOL_VERSION:
        raise ProtocolError(f"the request speaks graytune protocol {version} but this server speaks protocol "
                            f"{PROTOCOL_VERSION}; upgrade graytune on the server (or use a client that speaks "
                            f"protocol {PROTOCOL_VERSION})")
    if version < PROTOCOL_MIN:
        raise ProtocolError(f"the request speaks graytune protocol {version} but this server reads protocols "
                            f"{PROTOCOL_MIN} to {PROTOCOL_VERSION}; upgrade graytune on the client")
    return version


def read_request(body: bytes, max_tensors: int = 256) -> Message:
    """A request body as the server reads it: ``decode``, then ``check_request_protocol``."""
    message = decode(body, max_tensors)
    check_request_protocol(message[1])
    return message


def server_protocol() -> dict[str, int]:
    """What a server answers on ``/v1/spec``: the protocol it speaks and the oldest it still reads."""
    return {"protocol": PROTOCOL_VERSION, "protocol_min": PROTOCOL_MIN}


def check_server_protocol(info: Mapping[str, Any], url: str) -> int:
    """The protocol of the server at ``url`` from its ``/v1/spec`` answer; ``ProtocolError`` if it cannot
    read this client's messages (a server that names no version speaks 1)."""
    newest = message_protocol(info)
    oldest = message_protocol({"protocol": info.get("protocol_min", newest)})
    if oldest > PROTOCOL_VERSION:
        raise ProtocolError(f"the server at {url} speaks graytune protocol {newest} (and reads nothing older than "
                            f"{oldest}); this client speaks protocol {PROTOCOL_VERSION}; upgrade graytune on the "
                            "client (pip install -U graytune)")
    if newest < PROTOCOL_VERSION:
        raise ProtocolError(f"the server at {url} speaks graytune protocol {newest}; this client speaks protocol "
                            f"{PROTOCOL_VERSION}; upgrade graytune on the server (or downgrade the client)")
    return newest


# ---- a forward: the request and its answer -----------------------------------------------------------

@dataclass
class CallRequest:
    """A forward request as the server reads it, before its checks against the spec."""

    access: str | None  # the level asked for; None: the server's granted level
    inputs: dict[str, Tensor]  # port → e.g. ``[B, L]`` ids or ``[B, 3, H, W]`` pixels
    add: dict[str, Tensor]  # port → a delta broadcast onto its values
    insert: dict[str, Tensor]  # port → ``[B or 1, K, D]`` tokens
    texts: list[str] | None  # strings for the owner to tokenize, if sent instead of ids
    outputs: list[str] | None  # None: every output of the modalities sent
    reads: list[str]
    top_k: int = 0  # a language model's next tokens to read per position (``graytune.access.topk``)


def pack_call(plan: CallPlan, access: str, request: str | None = None) -> bytes:
    """A forward request for a checked ``plan`` at the level labelled ``access`` (e.g. ``"dark-gray"``).

    Tensors ``inputs/<port>``, ``add/<port>``, ``insert/<port>``; metadata ``access``, ``outputs``,
    ``reads``, ``grad`` (the names of the tensors that want gradients, from ``plan.slots``) and
    ``request`` (the key of this forward, the same on each retry) when given.

    Example:
        >>> request = unpack_call(decode(pack_call(plan, "dark-gray")))
    """
    tensors, meta = call_parts(plan, access)
    return encode(tensors, {**meta, "request": request} if request else meta)


def request_key(message: Message) -> str | None:
    """The key a forward request names (``request`` in its metadata), if a short string."""
    key = message[1].get("request")
    return key if isinstance(key, str) and 0 < len(key) <= 128 else None


def unpack_call(message: Message) -> CallRequest:
    """The forward request in ``message``; tensors named in ``grad`` come back with ``requires_grad``."""
    tensors, meta = message
    groups: dict[str, dict[str, Tensor]] = {group: {} for group in CALL_GROUPS}
    for name, tensor in tensors.items():
        group, _, port = name.partition("/")
        if group in groups:
            groups[group][port] = tensor
        elif group != GRAD:
            known = ", ".join(f"{g}/" for g in CALL_GROUPS)
            raise InvalidInputError(f"tensor {name!r}: names start with {known} or {GRAD}/")
    wanted = meta.get("grad", [])
    if not _names(wanted) or any(n not in tensors or n.startswith(f"{GRAD}/") for n in wanted):
        raise InvalidInputError(f"'grad' must list tensors of this request; got {str(wanted)[:200]}")
    integer = [n for n in wanted if not tensors[n].is_floating_point()]
    if integer:
        raise InvalidInputError(f"'grad' names {integer}, which hold integers (token ids, masks); gradients "
                                "exist only for float32 tensors: list the add/insert tensors instead")
    for name in wanted:
        tensors[name].requires_grad_(True)
    outputs, reads, texts = meta.get("outputs"), meta.get("reads", []), meta.get("texts")
    if outputs is not None and not _names(outputs):
        raise InvalidInputError(f"'outputs' must be a list of port names; got {outputs!r}")
    if not _names(reads):
        raise InvalidInputError(f"'reads' must be a list of port names; got {reads!r}")
    access, top_k = meta.get("access"), meta.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InvalidInputError(f"'top_k' must be a whole number of next tokens per position; got {str(top_k)[:50]}")
    return CallRequest(str(access) if access else None, groups[INPUTS], groups[ADD], groups[INSERT],
                       None if texts is None else texts_of(texts), outputs, reads, top_k)


@dataclass
class CallResult:
    """A forward's answer as the client reads it."""

    outputs: tuple[Tensor, ...]  # one per ``plan.outputs``, e.g. ``[B, E]`` embeddings
    values_read: dict[str, Tensor]  # port → its values, for each port in ``plan.reads``
    session: str | None  # the id to send the gradients to; None when nothing wants a gradient


def pack_result(plan: CallPlan, outputs: Sequence[Tensor], values_read: Mapping[str, Tensor],
                session: str | None) -> bytes:
    """A forward's answer: ``out/<port>`` per output, ``read/<port>`` per port read; metadata ``session``."""
    tensors = {tensor_name(OUT, name): value for name, value in zip(plan.outputs, outputs)}
    tensors.update({tensor_name(READ, name): value for name, value in values_read.items()})
    return encode(tensors, {"session": session})


def unpack_result(message: Message, plan: CallPlan) -> CallResult:
    """The answer to ``pack_call(plan, ...)``; a ``WireError`` naming any tensor it lacks."""
    tensors, meta = message
    names = [tensor_name(OUT, n) for n in plan.outputs] + [tensor_name(READ, n) for n in plan.reads]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise WireError(f"the server's answer lacks {missing} (it holds {sorted(tensors)}); "
                        "client and server may speak different protocol versions")
    return CallResult(tuple(tensors[tensor_name(OUT, n)] for n in plan.outputs),
                      {n: tensors[tensor_name(READ, n)] for n in plan.reads}, meta.get("session"))


# ---- a VJP: the outputs' gradients and the gradients at the client's tensors ------------------------

@dataclass
class VjpRequest:
    """A VJP request as the server reads it."""

    session: str | None  # the forward's session; None when ``recompute``
    recompute: bool  # the message holds the whole forward request too (see ``unpack_call``)
    grads: dict[str, Tensor]  # output port → its gradient, the output's shape (e.g. ``[B, E]``)

    def aligned(self, outputs: Sequence[str]) -> list[Tensor | None]:
        """The gradient for each of ``outputs`` (None where none was sent); an error naming any other."""
        extra = sorted(tensor_name(GRAD, port) for port in self.grads if port not in outputs)
        if extra:
            raise InvalidInputError(f"gradients for {extra} were sent; this call's outputs are {list(outputs)}")
        return [self.grads.get(port) for port in outputs]


def pack_grads(plan: CallPlan, grads: Sequence[Tensor | None], session: str) -> bytes:
    """A VJP request for the forward kept as ``session``: ``grad/<port>`` (float32) per output with a gradient."""
    return encode(_grad_tensors(plan, grads), {"session": session})


def pack_recompute(plan: CallPlan, access: str, grads: Sequence[Tensor | None]) -> bytes:
    """A VJP request that carries its forward again (after a 410): ``pack_call``'s parts, the gradients,
    and ``recompute: true``."""
    tensors, meta = call_parts(plan, access)
    return encode({**tensors, **_grad_tensors(plan, grads)}, {**meta, "recompute": True})


def unpack_grads(message: Message) -> VjpRequest:
    """The gradients and session of a VJP request (``unpack_call`` reads a recompute's forward)."""
    tensors, meta = message
    prefix = f"{GRAD}/"
    grads = {name.removeprefix(prefix): t for name, t in tensors.items() if name.startswith(prefix)}
    recompute, session = bool(meta.get("recompute")), meta.get("session")
    if not recompute and not isinstance(session, str):
        raise InvalidInputError("'session' must be the id the forward answered with")
    return VjpRequest(None if recompute else session, recompute, grads)


def pack_vjp(plan: CallPlan, grads: Sequence[Tensor | None]) -> bytes:
    """A VJP's answer: ``<group>/<port>`` (the request's own names) per client tensor with a gradient."""
    return encode({tensor_name(group, port): g for (group, port), g in zip(plan.slots, grads) if g is not None})


def unpack_vjp(message: Message, plan: CallPlan) -> tuple[Tensor | None, ...]:
    """The gradient at each of ``plan.slots`` (None where the answer has none)."""
    return tuple(message[0].get(tensor_name(group, port)) for group, port in plan.slots)


def unpack_inputs(message: Message) -> dict[str, Tensor]:
    """Input tensors by port from ``inputs/<port>`` names (hosted adapters; a bare ``<port>`` reads the same)."""
    return {name.removeprefix(f"{INPUTS}/"): t for name, t in message[0].items()}


def call_parts(plan: CallPlan, access: str) -> Message:
    """The tensors and metadata of a forward request for ``plan`` (``pack_call`` encodes them)."""
    tensors = {tensor_name(group, port): t for group in CALL_GROUPS for port, t in getattr(plan, group).items()}
    reads = plan.reads[:len(plan.reads) - len(TOP_K_NAMES)] if plan.top_k else plan.reads  # top_k asks those
    meta = {"access": access, "outputs": plan.outputs, "reads": reads,
            "grad": [tensor_name(group, port) for group, port in plan.slots]}
    return tensors, ({**meta, "top_k": plan.top_k} if plan.top_k else meta)


def _grad_tensors(plan: CallPlan, grads: Sequence[Tensor | None]) -> dict[str, Tensor]:
    return {tensor_name(GRAD, name): g.detach().float() for name, g in zip(plan.outputs, grads) if g is not None}


def _names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)
