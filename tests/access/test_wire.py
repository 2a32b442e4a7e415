"""The wire protocol: safetensors with the request in its metadata; every malformed message is refused;
the names and metadata keys clients already speak stay as they are; versions are checked both ways."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from graytune.access import CallPlan
from graytune.errors import InvalidInputError
from graytune.access.wire import (
    PROTOCOL_VERSION, ProtocolError, WireError, check_server_protocol, decode, encode, pack_call, pack_grads,
    pack_recompute, pack_result, pack_vjp, read_request, unpack_call, unpack_grads, unpack_result, unpack_vjp,
)


def test_round_trip_keeps_values_dtypes_and_metadata() -> None:
    tensors = {"inputs/text.input_ids": torch.tensor([[101, 7, 102]]), "add/x": torch.randn(2, 1, 5),
               "empty": torch.zeros(0, 3)}
    back, meta = decode(encode(tensors, {"outputs": ["text.embeds"], "grad": ["add/x"]}))
    assert meta == {"protocol": PROTOCOL_VERSION, "outputs": ["text.embeds"], "grad": ["add/x"]}
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


def _plan() -> CallPlan:
    ids, shift, extra = torch.tensor([[101, 7, 102]]), torch.randn(1, 1, 4), torch.randn(1, 2, 4)
    return CallPlan({"text.input_ids": ids, "text.attention_mask": torch.ones_like(ids)},
                    {"text.token_embeds": shift}, {"text.layer.2": extra}, ["text.embeds"], ["text.token_embeds"],
                    [("add", "text.token_embeds"), ("insert", "text.layer.2")])


def test_a_call_keeps_the_names_clients_already_send() -> None:
    plan = _plan()
    tensors, meta = decode(pack_call(plan, "light-gray"))
    assert set(tensors) == {"inputs/text.input_ids", "inputs/text.attention_mask", "add/text.token_embeds",
                            "insert/text.layer.2"}
    assert meta == {"protocol": 1, "access": "light-gray", "outputs": ["text.embeds"],
                    "reads": ["text.token_embeds"], "grad": ["add/text.token_embeds", "insert/text.layer.2"]}
    request = unpack_call((tensors, meta))
    assert (request.access, request.outputs, request.reads, request.texts) == (
        "light-gray", ["text.embeds"], ["text.token_embeds"], None)
    assert torch.equal(request.add["text.token_embeds"], plan.add["text.token_embeds"])
    assert request.add["text.token_embeds"].requires_grad and request.insert["text.layer.2"].requires_grad
    assert not request.inputs["text.input_ids"].requires_grad


def test_results_gradients_and_vjps_round_trip() -> None:
    plan, z = _plan(), torch.randn(1, 4)
    tensors, meta = decode(pack_result(plan, [z], {"text.token_embeds": torch.ones(1, 3, 4)}, "s1"))
    assert set(tensors) == {"out/text.embeds", "read/text.token_embeds"} and meta["session"] == "s1"
    result = unpack_result((tensors, meta), plan)
    assert torch.equal(result.outputs[0], z) and result.values_read["text.token_embeds"].shape == (1, 3, 4)
    with pytest.raises(WireError, match="lacks"):
        unpack_result(decode(encode({})), plan)

    asked = unpack_grads(decode(pack_grads(plan, [torch.ones(1, 4)], "s1")))
    assert (asked.session, asked.recompute) == ("s1", False) and asked.aligned(plan.outputs)[0].shape == (1, 4)
    with pytest.raises(InvalidInputError, match="outputs are"):
        asked.aligned(["image.embeds"])
    with pytest.raises(InvalidInputError, match="'session'"):
        unpack_grads(decode(encode({"grad/text.embeds": torch.ones(1, 4)})))

    again = decode(pack_recompute(plan, "light-gray", [torch.ones(1, 4)]))
    assert again[1]["recompute"] is True and unpack_grads(again).session is None
    assert set(unpack_call(again).add) == {"text.token_embeds"}

    grads = [torch.randn(1, 1, 4), None]
    tensors, _ = decode(pack_vjp(plan, grads))
    assert set(tensors) == {"add/text.token_embeds"}
    back = unpack_vjp((tensors, {}), plan)
    assert torch.equal(back[0], grads[0]) and back[1] is None


def test_a_message_without_a_version_is_read_as_version_1() -> None:
    from safetensors.torch import save

    old = save({"inputs/x": torch.zeros(1)}, metadata={"graytune": json.dumps({"outputs": ["text.embeds"]})})
    tensors, meta = read_request(old)
    assert "protocol" not in meta and set(tensors) == {"inputs/x"}


def test_a_newer_request_is_refused_with_what_to_do() -> None:
    with pytest.raises(ProtocolError, match=r"protocol 2 but this server speaks protocol 1; upgrade graytune on"):
        read_request(encode({}, {"protocol": PROTOCOL_VERSION + 1}))
    with pytest.raises(WireError, match="positive integer"):
        read_request(encode({}, {"protocol": "one"}))


def test_the_client_refuses_a_server_that_cannot_read_it() -> None:
    assert check_server_protocol({}, "http://old") == 1  # servers before versioning speak 1
    assert check_server_protocol({"protocol": 2, "protocol_min": 1}, "http://new") == 2  # still reads ours
    with pytest.raises(ProtocolError, match="speaks graytune protocol 3.*upgrade graytune on the client"):
        check_server_protocol({"protocol": 3, "protocol_min": 2}, "http://new")
    with pytest.raises(ProtocolError, match="upgrade graytune on the client"):
        check_server_protocol({"protocol": 2}, "http://new")
