"""The wire format: safetensors with the request in its metadata; every malformed message is refused."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from graytune.access.wire import WireError, decode, encode


def test_round_trip_keeps_values_dtypes_and_metadata() -> None:
    tensors = {"inputs/text.input_ids": torch.tensor([[101, 7, 102]]), "add/x": torch.randn(2, 1, 5),
               "empty": torch.zeros(0, 3)}
    back, meta = decode(encode(tensors, {"outputs": ["text.embeds"], "grad": ["add/x"]}))
    assert meta == {"outputs": ["text.embeds"], "grad": ["add/x"]}
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_non_contiguous_and_grad_tensors_are_sent_as_plain_values() -> None:
    t = torch.randn(4, 6, requires_grad=True)
    back, _ = decode(encode({"t": t.T}))
    assert torch.equal(back["t"], t.detach().T) and not back["t"].requires_grad


def _rewrite(body: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    size = struct.unpack("<Q", body[:8])[0]
    header = json.loads(body[8:8 + size])
    change(header)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body[8 + size:]


@pytest.mark.parametrize("change, words", [
    (lambda h: h["a"].update(dtype="F64"), "dtype F64"),
    (lambda h: h["a"].update(shape=[2, -1]), "non-negative"),
    (lambda h: h["a"].update(data_offsets=[0, 4]), "gives 4 bytes"),
    (lambda h: h["a"].update(extra=1), "dtype, shape and data_offsets"),
    (lambda h: h["__metadata__"].update(graytune="[1, 2]"), "JSON object"),
    (lambda h: h["__metadata__"].update(graytune="{not json"), "could not be read"),
])
def test_malformed_headers_are_refused(change, words) -> None:  # type: ignore[no-untyped-def]
    body = _rewrite(encode({"a": torch.zeros(2, 3)}, {"k": 1}), change)
    with pytest.raises(WireError, match=words):
        decode(body)


def test_overlapping_ranges_and_too_many_tensors() -> None:
    two = encode({"a": torch.zeros(2), "b": torch.zeros(2)})
    body = _rewrite(two, lambda h: h["b"].update(data_offsets=h["a"]["data_offsets"]))
    with pytest.raises(WireError, match="overlap|accounts for"):
        decode(body)
    with pytest.raises(WireError, match="at most 1"):
        decode(two, max_tensors=1)
    with pytest.raises(WireError, match="not valid JSON"):
        decode(struct.pack("<Q", 4) + b"\xff\xfe{}")
