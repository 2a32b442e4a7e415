"""The wire format shared by the remote client and the server: safetensors, never pickle.

A message is one safetensors blob: an 8-byte header length, a JSON header giving
each tensor's dtype, shape and byte range, then the raw little-endian bytes. The
request's other fields (outputs, texts, session) ride in the header's
``__metadata__`` as one JSON string. ``decode`` checks the header against the body
before any tensor is built: allowed dtypes, shapes, byte ranges that tile the body
exactly, and a bounded header.

Example:
    >>> body = encode({"add/text.token_embeds": torch.zeros(1, 1, 384)}, {"outputs": ["text.embeds"]})
    >>> tensors, meta = decode(body)
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from graytune.errors import InvalidInputError

Tensor = torch.Tensor

#: dtypes allowed on the wire (safetensors name → bytes per element); ports take float32 or int64.
WIRE_DTYPES = {"F32": 4, "I64": 8}
MAX_HEADER_BYTES = 1 << 20
_META_KEY = "graytune"


class WireError(InvalidInputError):
    """A message that is not a well-formed graytune safetensors blob."""


def encode(tensors: Mapping[str, Tensor], meta: Mapping[str, Any] | None = None) -> bytes:
    """One safetensors blob holding ``tensors`` (made contiguous, on CPU) and ``meta`` as JSON."""
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    return st_save(plain, metadata={_META_KEY: json.dumps(dict(meta or {}))})


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
    if size > MAX_HEADER_BYTES or 8 + size > len(body):
        raise WireError(f"the header claims {size} bytes but the body has {len(body) - 8} after its length; "
                        f"headers are at most {MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(body[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WireError("the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise WireError("the header must be a JSON object")
    return header
